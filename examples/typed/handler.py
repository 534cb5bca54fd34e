"""A typed async handler: `HandlerEvent[SumInput]` validates the input before the call.

A job whose input does not fit (`{"numbers": "x"}`) fails with a 400-style structured error
naming the field, and the handler never runs.
"""

from pydantic import BaseModel, Field

from handler_worker import HandlerEvent


class SumInput(BaseModel):
    numbers: list[float] = Field(min_length=1)
    scale: float = 1.0


async def handler(event: HandlerEvent[SumInput]) -> dict:
    total = sum(event.input.numbers) * event.input.scale
    return {"job": event.id, "sum": total, "count": len(event.input.numbers)}
