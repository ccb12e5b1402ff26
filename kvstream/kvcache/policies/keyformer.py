"""`keyformer` (arXiv 2403.09054): a recent window plus "key" tokens ranked by the accumulated score
f_j = softmax_j((x_j + g_j) / tau), g Gumbel(0, 1) noise fresh per element, layer and step, tau rising linearly
from tau_init (prefill) to tau_end over max_new_tokens. The noisy score only selects: attention outputs use the
ordinary softmax. Unlike the original code, the token leaving the recent window keeps competing with the key
tokens at every decode step (see DESIGN.md)."""

from kvstream.kvcache.policies.base import Policy, register


@register("keyformer")
class KeyformerPolicy(Policy):
    scored = True
    noisy = True

    def select(self, scores, m, cap, h, device):
        return self._topk(scores, min(m, cap))
