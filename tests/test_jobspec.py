"""YAML job files: every mistake is a KenError naming the file and the field, before any work."""
import pytest

from ken_dist.errors import KenError
from ken_dist.job.spec import load_job_file

GOOD = {"base": "/m/base", "store": "/s", "keep": 0.25, "finetunes": ["/m/ft"]}


def dump(tmp_path, data, name="job.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def with_(**change):
    data = {**GOOD, **change}
    return {k: v for k, v in data.items() if v is not ...}


CASES = [
    (with_(base=...), r"missing field `base`"),
    (with_(store=""), r"missing field `store`"),
    (with_(finetunes=[]), r"`finetunes` must be a non-empty list"),
    (with_(finetuens=["x"]), r"unknown field\(s\) finetuens"),
    (with_(base=3), r"`base` must be a path"),
    (with_(keep="0.25"), r"`keep` must be a fraction"),
    (with_(keep=1.5), r"keep must be a fraction in \(0, 1\], got 1.5"),
    (with_(keep=..., k=0), r"k must be >= 1"),
    (with_(keep=..., k=True), r"`k` must be an integer"),
    (with_(keep=...), r"finetunes\[0\] \(ft\): no `k` or `keep`"),
    (with_(finetunes=[{"source": "/m/a", "k": 2.5}]), r"finetunes\[0\] \(a\): `k` must be an integer"),
    (with_(finetunes=[{"source": "/m/a", "strategy": "kne"}]), r"finetunes\[0\] \(a\): unknown strategy 'kne'"),
    (with_(finetunes=[{"name": "a"}]), r"finetunes\[0\]: missing `source`"),
    (with_(finetunes=[{"source": "/m/a", "path": "/m/b"}]), r"`source` or `path`.*not both"),
    (with_(finetunes=[{"source": "/m/a", "lr": 1}]), r"finetunes\[0\]: unknown field\(s\) lr"),
    (with_(finetunes=["/m/a", "/x/a"]), r"two fine-tunes are named 'a'"),
    (with_(finetunes=[3]), r"finetunes\[0\]: expected a mapping"),
    (with_(include="(unclosed"), r"`include` holds an invalid regex '\(unclosed'"),
    (with_(exclude=[1]), r"`exclude` must be a regex or a list"),
    (with_(preset="attention"), r"`preset` must be one of all, attention-only"),
    (with_(prefix_map=["bert."]), r"`prefix_map` must map"),
    (with_(block_bytes="lots"), r"`block_bytes`: not a byte size"),
    (with_(block_bytes=-1), r"`block_bytes` must be positive"),
    (with_(cluster={"workers": 0}), r"workers must be a positive integer"),
    (with_(cluster={"workers": "2"}), r"`cluster.workers` must be a positive integer"),
    (with_(cluster={"placement": "tpu"}), r"`cluster.placement` must be one of mixed, gpu, cpu"),
    (with_(cluster={"nodes": 3}), r"`cluster` takes only address, placement, workers"),
    (with_(workers=2, cluster={"workers": 3}), r"`workers` is given both at the top and under `cluster`"),
    ("base: [unclosed", r"is not valid YAML"),
    ("- just\n- a list\n", r"expected a mapping"),
]


@pytest.mark.parametrize("data, pattern", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_job_files_name_the_file_and_field(tmp_path, data, pattern):
    path = dump(tmp_path, data)
    with pytest.raises(KenError, match=pattern) as err:
        load_job_file(path)
    assert str(path) in str(err.value)


def test_missing_job_file(tmp_path):
    with pytest.raises(KenError, match="does not exist"):
        load_job_file(tmp_path / "nope.yaml")


def test_defaults_overrides_and_sizes(tmp_path):
    job = load_job_file(dump(tmp_path, with_(block_bytes="1MiB", strategy="magnitude", finetunes=[
        "/m/a", {"name": "b", "path": "/m/b2", "k": 7}, {"source": "org/c", "revision": "v1", "keep": 0.5}],
        cluster={"address": "auto", "workers": 3, "placement": "cpu"})))
    a, b, c = job.finetunes
    assert (a.name, a.params.keep, a.params.strategy) == ("a", 0.25, "magnitude")
    assert (b.name, b.source, b.params.k, b.params.keep) == ("b", "/m/b2", 7, None)
    assert (c.name, c.revision, c.params.keep) == ("c", "v1", 0.5)
    assert (job.block_bytes, job.address, job.workers, job.placement) == (2**20, "auto", 3, "cpu")


def test_a_path_no_file_name_can_hold_is_refused(tmp_path):
    """A YAML escape can write a lone UTF-16 surrogate, which the OS cannot encode (found by
    tests/fuzz: it ended in a UnicodeEncodeError traceback when the store was opened)."""
    from ken_dist.errors import InputError

    job = tmp_path / "job.yaml"
    job.write_text('base: ./base\nstore: "./s\\ud800"\nkeep: 0.25\nfinetunes: [./ft]\n')
    with pytest.raises(InputError, match="not a usable path"):
        load_job_file(job)
