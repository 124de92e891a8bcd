"""Producer-side helper for the background threads that fill bounded queues."""

import queue
import threading


def put_until(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` into ``q`` unless ``stop`` is set first; False if it gave up.

    A plain blocking put on a full queue would hang a producer (and the consumer joining it)
    once the consumer has stopped reading early: an exception in the training step, a break.
    """
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
