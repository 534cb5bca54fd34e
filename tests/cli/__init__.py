"""Tests of `handlerctl` (cli/handlerctl): job commands, the build scan, image builds."""
