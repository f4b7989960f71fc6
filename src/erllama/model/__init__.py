"""One loaded model: its worker on the event loop and its native thread.

* :mod:`.worker`: lifecycle, intake, cancellation, delivery (event loop);
* :mod:`.thread`: the native thread that owns the handle and runs steps back to back;
* :mod:`.scheduler`: batch scheduling as a synchronous state machine;
* :mod:`.kv`: live-KV reuse, restores and saves (model thread);
* :mod:`.output`: tokens to stream events (model thread);
* :mod:`.request`: one request's parts; :mod:`.intake`: checking what callers ask;
* :mod:`.calls`: calls from the loop into the thread; :mod:`.adapters`: the LoRA set.
"""

from .worker import ModelWorker as ModelWorker

__all__ = ["ModelWorker"]
