"""Functions and a class that the generic examples run remotely."""


def add(a, b):
    return a + b


class Counter:
    def __init__(self, start=0):
        self.value = start

    def bump(self, by=1):
        self.value += by
        return self.value
