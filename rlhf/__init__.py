"""pluggable-rlhf: PPO and best-of-N over pluggable reward providers (see README.md)."""

import os as _os

# oneDNN, torch's CPU matmul library, keeps every matmul primitive it has made, keyed by shapes,
# up to 1,024 of them, each holding its own buffers. RLHF passes change length from batch to
# batch, so new primitives keep coming: on the PPO benchmark the live heap grew by about 20 MB an
# update (940 → 1,047 MB over 5 updates). One update uses about 70 distinct primitives (a
# decoding step a handful, reused for every token). Capped at 64: 935 → 992 MB over 5 updates,
# 1,041 MB after 20 (growing by about 2 MB an update by then), 90-150 MB less peak RSS in the
# benchmark, and no measurable change in speed. A capacity of 0 doubled the sampling time. This
# takes effect only where it is set before torch's first CPU matmul; a value the user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
