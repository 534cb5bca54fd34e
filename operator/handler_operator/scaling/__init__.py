"""Scaling of worker Deployments: `policies` decides (pure), `observations` turns what is read
into the policy's view (pure), `actions` drains through the gateway, `engines` runs the loop
that reads and acts (Kubernetes, gateway)."""
