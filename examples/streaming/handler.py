"""A generator handler: yields one chunk per word, streamed to clients as it runs.

`return_aggregate_stream = True` also puts the list of chunks in the final job output.
"""

import time

return_aggregate_stream = True


def handler(job):
    text = (job.get("input") or {}).get("text", "tokens arrive one by one")
    delay = float((job.get("input") or {}).get("delay", 0))
    for index, word in enumerate(text.split()):
        if delay:
            time.sleep(delay)
        yield {"index": index, "token": word}
