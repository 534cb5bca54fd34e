"""The smallest handler: a sync function that greets `input.name`."""


def handler(job):
    name = (job.get("input") or {}).get("name", "world")
    return {"greeting": f"Hello, {name}!"}
