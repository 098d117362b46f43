"""How tests/data/v1_store was made: with the code of the last format-1-only commit (671fadb),
unpacked beside this repository, never with the current code:

    mkdir -p /tmp/head && git archive 671fadb ken_dist tests/store_helpers.py | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head python tests/data/make_v1_fixture.py tests/data/v1_store

It writes a tiny base and fine-tune (bf16, fp32, fp16 tensors of random bits, NaN payloads and
subnormals included, and an int64 tensor stored whole), prunes them into a store with random
masks through that code's Store, and saves what that code's reader rebuilt as
expected.safetensors. tests/test_codecs.py reads the store with today's code bit for bit.
"""
import os
import shutil
import sys

sys.path.insert(0, "/tmp/head")
sys.path.insert(0, "/tmp/head/tests")

import store_helpers as helpers  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import ken_dist  # noqa: E402
from ken_dist.subnetwork.view import open_subnetwork  # noqa: E402

if not ken_dist.__file__.startswith("/tmp/head"):
    raise SystemExit(f"run with PYTHONPATH=/tmp/head (the old code), not {ken_dist.__file__}")
out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
tensors = {"a.weight": ((6, 20), torch.bfloat16), "b.weight": ((5, 9), torch.float32),
           "c.bias": ((13,), torch.float16), "n.steps": ((3,), torch.int64)}
base, ft, bdir, fdir = helpers.make_checkpoints(out, tensors, seed=7)
masks = helpers.prune_into(os.path.join(out, "store"), "tiny", ft, bdir, fdir, keep=0.4, block_rows=4)
with open_subnetwork(os.path.join(out, "store"), "tiny", base=bdir) as sub:
    rebuilt = {k: sub.get_tensor(k).contiguous() for k in sub.keys()}
for k in rebuilt:
    assert helpers.same_bits(rebuilt[k], helpers.expected(base, ft, masks, k)), k
save_file(rebuilt, os.path.join(out, "expected.safetensors"))
os.unlink(os.path.join(out, "store", "finetunes", "tiny", ".lock"))
print("wrote", out, sorted(rebuilt))
