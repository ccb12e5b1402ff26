"""`sink`: StreamingLLM (arXiv 2309.17453): the first `sink` tokens (attention sinks) + the last k - sink."""

from kvstream.kvcache.policies.base import Policy, register


@register("sink")
class SinkPolicy(Policy):
    keeps_prefix = True

    def select(self, scores, m, cap, h, device):
        return self._first(m, min(m, cap, self.cfg.sink), h, device)
