"""`handlerctl`: the local dev loop, job commands against any gateway, manifests and builds.

`commands` is the typer app, `runners` the `handlerctl dev` runner, `projects` the build scan.
"""
