"""How tests/data/store_v2_b4d9403 was made: with the code of b4d9403 (the release before
`fit-scales` and its store rewrite), unpacked beside this repository, never with the current code:

    mkdir -p /tmp/v2head && git archive b4d9403 ken_dist tests/store_helpers.py | tar -x -C /tmp/v2head
    PYTHONPATH=/tmp/v2head python tests/data/make_v2_fixture.py tests/data/store_v2_b4d9403

It writes a tiny base and fine-tune (bf16, fp32 and fp16 tensors, the fine-tune the base plus
small seeded noise, so that every delta is finite as lossy codecs need; one 4096-wide tensor so
that keep 0.005 stores a position list; an int64 tensor stored whole), and prunes them with random
masks through that code's Store into three format-2 fine-tunes: `sign-g8` and `int4` at keep 0.4,
`sign` at keep 0.005. expected.json holds the sha256 of every tensor as that code's reader rebuilt
it. tests/test_compat.py reads the store with today's code bit for bit.
"""
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, "/tmp/v2head")
sys.path.insert(0, "/tmp/v2head/tests")

import store_helpers as helpers  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import ken_dist  # noqa: E402
from ken_dist.store.protocol import Store  # noqa: E402
from ken_dist.subnetwork.view import open_subnetwork  # noqa: E402

if not ken_dist.__file__.startswith("/tmp/v2head"):
    raise SystemExit(f"run with PYTHONPATH=/tmp/v2head (the old code), not {ken_dist.__file__}")
out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
gen = torch.Generator().manual_seed(11)
shapes = {"a.weight": ((6, 40), torch.bfloat16), "b.weight": ((5, 24), torch.float32),
          "c.bias": ((30,), torch.float16), "w.weight": ((4, 4096), torch.bfloat16)}
base = {n: (torch.randn(s, generator=gen) * 0.5).to(d) for n, (s, d) in shapes.items()}
ft = {n: (base[n].float() + torch.randn(s, generator=gen) * 0.01).to(d) for n, (s, d) in shapes.items()}
base["n.steps"] = torch.arange(3)
ft["n.steps"] = torch.arange(3) + 5
bdir, fdir = os.path.join(out, "base"), os.path.join(out, "ft")
for d, sd in ((bdir, base), (fdir, ft)):
    os.makedirs(d)
    save_file(sd, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "toy"}, f)
store = os.path.join(out, "store")
expected = {}
for name, codec, keep in (("sign-g8", "sign-g8", 0.4), ("int4", "int4", 0.4), ("low-sign", "sign", 0.005)):
    helpers.prune_into(store, name, ft, bdir, fdir, keep=keep, block_rows=2, codec=codec,
                       params={**helpers.PARAMS, "keep": keep, "values": codec})
    with open_subnetwork(store, name, base=bdir) as sub:
        expected[name] = {k: hashlib.sha256(sub.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy()
                                            .tobytes()).hexdigest() for k in sub.keys()}
    os.unlink(os.path.join(store, "finetunes", name, ".lock"))
    m = Store(store).manifest(name)
    assert m["format_version"] == 2, name
kinds = {b.get("index", "mask") for b in Store(store).manifest("low-sign")["tensors"]["w.weight"]["blocks"]}
assert "positions" in kinds, kinds
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"written_by": "b4d9403", "expected_sha256": expected}, f, indent=1, sort_keys=True)
print("wrote", out, sorted(expected))
