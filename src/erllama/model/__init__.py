"""One loaded model: its worker on the event loop and its native thread.

* :mod:`.worker`: lifecycle, intake, cancellation, delivery (event loop); the package face
  exports it, and nothing else imports it;
* :mod:`.gate`: the one door from the loop into the model (calls on the thread, counted
  native calls off it, the serving check, unload's wait);
* :mod:`.sides`: the two narrow protocols between the halves (``LoopSide``, ``OnThread``);
* :mod:`.snapshot`: what the loop reads of the thread, frozen and replaced whole;
* :mod:`.thread`: the native thread that owns the handle and runs steps back to back;
* :mod:`.scheduler`: batch scheduling as a closed, synchronous state machine;
* :mod:`.kv`: live-KV reuse, restores and saves (model thread);
* :mod:`.output`: tokens to stream events (model thread);
* :mod:`.request`: one request's parts; :mod:`.intake`: checking what callers ask;
* :mod:`.text`, :mod:`.adapters`, :mod:`.operations`: the calls a model answers;
* :mod:`.routing`: routing queries, pure over the cache and a snapshot;
* :mod:`.calls`: calls from the loop into the thread.
"""

from .worker import ModelWorker as ModelWorker

__all__ = ["ModelWorker"]
