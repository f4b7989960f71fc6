"""Whether a request decodes speculatively, decided once at intake (on the event loop).

A request speculates when its model was loaded with ``ModelConfig.speculative`` and the
backend verifies drafts (the ``speculative`` feature), unless it says ``speculative=False``.
A drafted token is accepted where it is the token plain decoding would choose at its place:
the greedy choice, or for a request that draws (temperature > 0), the request's own draw
from that place's logits, the draw that does not match being the next token. So a greedy
answer is the plain decode's token for token, and a drawn one follows exactly the plain
decode's distribution (with a seed, the same tokens: each place is drawn once, in order,
from the same random stream). Requests that ask for log-probabilities or set a thinking
budget decode plainly (each of their tokens may change what the next step feeds). Asking
for speculation (``speculative=True``) where it cannot apply is an InvalidRequest naming
the reason, not a silent plain decode.
"""

from __future__ import annotations

from typing import Any

from ..backends.types import LoadedModel
from ..config import MAX_DRAFT, ModelConfig
from ..errors import InvalidRequest
from ..speculative.control import DraftControl
from ..speculative.cost import PassCost
from ..speculative.hookspecs import Drafter
from ..speculative.registry import DrafterPlugin
from .intake import RequestArgs

__all__ = ["draft_control"]


def draft_control(
    config: ModelConfig,
    plugin: DrafterPlugin | None,
    loaded: LoadedModel,
    args: RequestArgs,
    *,
    prefill_only: bool,
    drafter: Drafter | None = None,
    cost: PassCost | None = None,
    state: Any = None,
) -> DraftControl | None:
    """The request's draft control (its ``context`` still to bind), or None for a plain
    decode. ``drafter`` (``Engine.verify``'s) replaces the model's and requires drafting."""
    asked = True if drafter is not None else args.speculative
    if asked is False or prefill_only or args.max_tokens == 0:
        return None
    spec = config.speculative
    why: str | None = None
    if drafter is None and (spec is None or plugin is None):
        why = "the model was loaded without speculative decoding (ModelConfig.speculative)"
    elif "speculative" not in loaded.features:
        why = f"backend {config.backend!r} does not verify drafts"
    elif args.logprobs is not None:
        why = "does not combine with logprobs"
    elif args.thinking_budget_tokens is not None:
        why = "does not combine with a thinking budget"
    if why is not None:
        if asked:
            raise InvalidRequest("speculative", why)
        return None
    if drafter is not None:
        return DraftControl(drafter, MAX_DRAFT, cost=cost)
    assert spec is not None and plugin is not None
    limit = args.draft_max if args.draft_max is not None else spec.draft_max
    if limit == 0:
        return None
    return DraftControl(plugin.new(spec, state), limit, cost=cost)
