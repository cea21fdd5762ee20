"""minitriton: MiniCache KV-cache compression across depth (Liu et al., NeurIPS 2024), as
Triton kernels with a torch path for CPUs.

    m = minitriton.merge(k_prev, k_cur, t=0.6, gamma=0.05)   # [B, H, S, D] x 2 -> MergedPair
    k_prev_hat, k_cur_hat = minitriton.restore(m)
    o = minitriton.decode_attention(q, m_k, m_v, layer="cur")  # over the compressed cache
"""

from .cache import MergePlan, MiniCache, PairSpec
from .calibrate import calibrate
from .decode import decode_attention
from .merge import merge, restore
from .pair import MergedPair

__all__ = ["merge", "restore", "decode_attention", "MergedPair", "MiniCache", "MergePlan",
           "PairSpec", "calibrate"]
__version__ = "0.1.0"
