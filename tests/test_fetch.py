"""`python -m fastgen download` against the fake Hub served over HTTP (tests/fakehub.py `HubServer`), into an
empty cache: the plan, progress, resuming, the disk checks and one clear message per failure."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgen import fetch, hub
from fastgen.__main__ import main
from fastgen.registry import get_family
from tests.fakehub import SDXL_BASE, SDXL_LCM_LORA, SDXL_LCM_UNET, SDXL_TURBO

ROOT = Path(__file__).resolve().parent.parent
BASE_UNET = (SDXL_BASE, "unet/diffusion_pytorch_model.fp16.safetensors")
TURBO_UNET = (SDXL_TURBO, "unet/diffusion_pytorch_model.fp16.safetensors")


def subprocess_env(**values):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    return {**env, **values}


def resolved(server, method="GET"):
    """(repo, file) pairs whose content the server sent."""
    pairs = []
    for command, path, _ in server.requests:
        if command == method and "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/")
            pairs.append((repo, rest.split("/", 1)[1]))
    return pairs


def blobs_intact(cache):
    """No partial files left, and every LFS blob's content matches its name (the sha256)."""
    assert not list(cache.rglob("*.incomplete"))
    for blob in cache.glob("models--*/blobs/*"):
        if len(blob.name) == 64:
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_plan_lists_per_method_files_and_sizes(online, server):
    sdxl = get_family("sdxl")
    plan = fetch.plan([sdxl.method(m) for m in sdxl.default_methods], fetch.HubListing())
    assert [name for name, _ in plan.methods] == ["turbo", "lcm", "lcm-lora", "baseline"]
    files = {f.label: f for f in plan.files}
    assert f"{SDXL_BASE}/unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert f"{SDXL_LCM_UNET}/diffusion_pytorch_model.fp16.safetensors" in files
    assert f"{SDXL_LCM_LORA}/pytorch_lora_weights.safetensors" in files
    assert not [f for f in files if f.endswith(("model.safetensors", ".bin")) and ".fp16." not in f and "lora" not in f]
    unet = files[f"{SDXL_BASE}/unet/diffusion_pytorch_model.fp16.safetensors"]
    assert unet.size == (server.files(SDXL_BASE)[BASE_UNET[1]]).stat().st_size > 100_000
    assert unet.revision == server.snapshot(SDXL_BASE)[0]
    assert plan.total_bytes == sum(f.size for f in plan.files)
    baseline = dict(plan.methods)["baseline"]
    assert {f.repo for f in baseline} == {SDXL_BASE}


def test_a_method_with_a_file_per_step_count_plans_every_file(fake_hub):
    plan = fetch.plan([get_family("sdxl").method("lightning"), get_family("sdxl").method("dmd2")], fetch.CacheListing())
    names = {f.name for _, files in plan.methods for f in files}
    assert {"sdxl_lightning_1step_unet_x0.safetensors", "sdxl_lightning_2step_unet.safetensors",
            "sdxl_lightning_4step_unet.safetensors", "sdxl_lightning_8step_unet.safetensors",
            "dmd2_sdxl_4step_unet_fp16.safetensors", "dmd2_sdxl_1step_unet_fp16.bin"} <= names


def test_a_repo_that_no_longer_has_a_methods_files_is_named(fake_hub):
    class Changed(fetch.CacheListing):  # the LoRA file was renamed upstream
        def files(self, repo):
            return {n.replace("pytorch_lora", "lora"): s for n, s in super().files(repo).items()}

    with pytest.raises(fetch.DownloadError, match=f"^{SDXL_LCM_LORA} no longer has the files LCM-LoRA loads"):
        fetch.plan(get_family("sdxl").methods, Changed())


def test_dry_run_lists_files_sizes_and_free_space(online, server, capsys):
    assert main(["download", "--family", "sdxl", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sdxl: 4 methods, ") and "still to download" in out
    assert "  turbo: " in out and "  baseline: 18 files" in out and "all listed above" in out
    assert f"MB  {SDXL_LCM_LORA}/pytorch_lora_weights.safetensors" in out
    assert f"free space where the Hub cache lives ({online})" in out
    assert not [pair for pair in resolved(server) if pair[1] != "model_index.json"]  # only the small index files


def test_download_shows_progress_and_a_rerun_fetches_nothing(online, server, capsys):
    assert main(["download", "--family", "sdxl"]) == 0
    captured = capsys.readouterr()
    assert "B/s" in captured.err and "100%" in captured.err  # one bar: bytes and rate
    assert f"into {online}" in captured.out
    sdxl = get_family("sdxl")
    assert hub.missing_repos([sdxl.method(m) for m in sdxl.default_methods]) == []
    assert hub.missing_repos([sdxl.method("lightning")]) == ["ByteDance/SDXL-Lightning"]  # not asked for
    blobs_intact(online)
    fetched = len(resolved(server))

    assert main(["download", "--family", "sdxl"]) == 0
    assert "every file is already in" in capsys.readouterr().out
    assert len(resolved(server)) == fetched  # nothing sent twice


def test_methods_fetch_only_those_methods(online, server, capsys):
    assert main(["download", "--family", "sdxl", "--methods", "turbo,lcm-lora"]) == 0
    repos = {repo for repo, _ in resolved(server)}
    assert repos == {SDXL_TURBO, SDXL_BASE, SDXL_LCM_LORA}
    assert hub.missing_files(get_family("sdxl").method("turbo")) == []
    assert hub.missing_files(get_family("sdxl").method("lcm")) == [SDXL_LCM_UNET]
    assert main(["download", "--family", "sdxl", "--methods", "hyper"]) == 2
    assert "`method` must be one of" in capsys.readouterr().err


def test_dropped_connection_resumes_from_where_it_stopped(online, server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 65536)  # resumes at a chunk boundary
    server.cut[BASE_UNET] = 100_000
    assert main(["download", "--family", "sdxl", "--methods", "baseline"]) == 0
    ranges = [r for command, path, r in server.requests if command == "GET" and path.endswith(BASE_UNET[1])]
    assert ranges == [None, "bytes=65536-"]
    blobs_intact(online)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_download_resumes_with_the_files_that_finished(server, tmp_path, stop):
    cache = tmp_path / "cache"
    # A read timeout longer than the stall: on a loaded machine huggingface_hub's own 10 s timeout could fire
    # first and retry, and the stop would then land in its retry instead of the read it is meant to interrupt.
    env = subprocess_env(HF_ENDPOINT=server.endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DOWNLOAD_TIMEOUT="120")
    command = [sys.executable, "-m", "fastgen", "download", "--family", "sdxl", "--methods", "turbo,baseline"]
    server.stall[BASE_UNET] = 60  # half of the base UNet arrives, then the download is stopped
    # The child gets the default SIGINT disposition: it inherits this process's, and a library loaded by an
    # earlier test may have set it to "ignore", which Python in the child would then keep.
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not list(cache.glob("models--*/blobs/*.incomplete")) or BASE_UNET not in resolved(server):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    run.send_signal(stop)
    out, err = run.communicate(timeout=30)
    if stop == signal.SIGINT:
        assert run.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("interrupted: the files that finished are kept")
        assert not list(cache.rglob("*.incomplete"))  # huggingface_hub removed its partial file
    else:
        assert len(list(cache.rglob("*.incomplete"))) == 1  # a kill leaves the partial file behind
    first = resolved(server)
    assert TURBO_UNET in first
    assert not list(cache.glob(f"models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/*/{BASE_UNET[1]}"))

    server.stall.clear()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("removed 1 half-fetched files" in done.stdout) == (stop == signal.SIGKILL)
    again = resolved(server)[len(first):]
    assert TURBO_UNET not in again and BASE_UNET in again  # finished files are kept; the cut one is fetched
    assert len(again) < len(first)
    blobs_intact(cache)


def test_refuses_up_front_when_the_disk_is_too_small(online, server, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "free_bytes", lambda path: 1000)
    assert main(["download", "--family", "sdxl"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not enough disk space: the download needs ")
    assert "1.0 kB free" in err and "HF_HUB_CACHE" in err
    assert not [pair for pair in resolved(server) if pair[1] != "model_index.json"]


def test_disk_full_mid_way_leaves_nothing_half_written(online, server, monkeypatch, capsys):
    import huggingface_hub.file_download as file_download

    real_http_get = file_download.http_get

    def filling_disk(url, temp_file, **kwargs):
        if f"/{SDXL_BASE}/" in url and url.endswith(BASE_UNET[1]):
            temp_file.write(b"\0" * 50_000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_http_get(url, temp_file, **kwargs)

    monkeypatch.setattr(file_download, "http_get", filling_disk)
    assert main(["download", "--family", "sdxl", "--methods", "turbo,baseline"]) == 1
    err = capsys.readouterr().err
    assert "error: the disk filled up while downloading " + "/".join(BASE_UNET) in err
    assert "run the same command again" in err and "Traceback" not in err
    assert hub.missing_files(get_family("sdxl").method("turbo")) == []  # what finished is kept
    assert hub.missing_files(get_family("sdxl").method("baseline")) == [SDXL_BASE]
    assert not list(online.glob(f"models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/*/{BASE_UNET[1]}"))
    blobs_intact(online)


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda s: s.gated.add(SDXL_LCM_LORA),
         [f"{SDXL_LCM_LORA} is gated", f"https://huggingface.co/{SDXL_LCM_LORA}", "hf auth login", "HF_TOKEN"]),
        (lambda s: s.gone.add(SDXL_LCM_UNET), [f"{SDXL_LCM_UNET} was not found at", "private", "gone"]),
        (lambda s: s.gone_files.add((SDXL_LCM_UNET, "diffusion_pytorch_model.fp16.safetensors")),
         [f"{SDXL_LCM_UNET}/diffusion_pytorch_model.fp16.safetensors is no longer on the Hub"]),
    ],
    ids=["gated", "repo-gone", "file-gone"],
)
def test_hub_refusals_give_one_clear_message(online, server, capsys, break_it, expected):
    break_it(server)
    assert main(["download", "--family", "sdxl"]) == 1
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]  # under the progress bar, when the failure comes mid-download
    assert message.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in message


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry-run", "download"])
@pytest.mark.parametrize("network", ["unreachable", "offline"])
def test_no_network_fails_fast_with_one_sentence(tmp_path, network, dry_run):
    values = dict(HF_HUB_CACHE=str(tmp_path))
    values.update(HF_ENDPOINT="http://127.0.0.1:9") if network == "unreachable" else values.update(HF_HUB_OFFLINE="1")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fastgen", "download", "--family", "sdxl", *dry_run], cwd=ROOT,
                          env=subprocess_env(**values), capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - start
    assert done.returncode == 1 and seconds < 10, (seconds, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not done.stdout, done.stderr
    assert "HF_HUB_OFFLINE" in lines[0]
    if network == "unreachable":
        assert "http://127.0.0.1:9 cannot be reached" in lines[0]


@pytest.mark.slow
def test_a_silent_endpoint_fails_within_the_probe_timeout(tmp_path):
    """A network that drops packets: the connection opens but nothing ever answers."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "fastgen", "download", "--family", "sdxl", "--dry-run"],
                              cwd=ROOT, env=subprocess_env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path)),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - start < 10
    assert done.stderr.startswith(f"error: the Hub at {endpoint} cannot be reached (timed out)")


def test_describe_names_what_to_do_for_each_library_error(monkeypatch):
    """The real exception types, built as huggingface_hub 2.4 builds them, each map to a message."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import httpx2
    from huggingface_hub import errors

    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{SDXL_BASE}")

    def http(cls, status):
        return cls("refused", response=httpx2.Response(status, request=request))

    assert "is gated" in fetch.describe(http(errors.GatedRepoError, 401), SDXL_BASE)
    assert "was not found" in fetch.describe(http(errors.RepositoryNotFoundError, 401), SDXL_BASE)
    assert "no longer on the Hub" in fetch.describe(http(errors.RemoteEntryNotFoundError, 404), SDXL_BASE, "x")
    assert "401 unauthorized" in fetch.describe(http(errors.HfHubHTTPError, 401), SDXL_BASE)
    assert "try again later" in fetch.describe(http(errors.HfHubHTTPError, 503), SDXL_BASE)
    assert "cannot be reached" in fetch.describe(httpx2.ConnectError("refused"), SDXL_BASE)
    assert "disk filled up" in fetch.describe(OSError(errno.ENOSPC, "No space left on device"), SDXL_BASE, "x")
    assert fetch.describe(ValueError("something else"), SDXL_BASE) is None


def test_space_card_preloads_exactly_what_the_default_family_loads(fake_hub):
    """The README front matter is the Space card: it lists the sdxl repos and preloads the files a download of
    the sdxl family would fetch (computed here from the fake Hub, which has the real repos' file names)."""
    from huggingface_hub import SpaceCard
    from huggingface_hub.utils import validate_repo_id

    card = SpaceCard.load(ROOT / "README.md")
    sdxl = get_family("sdxl")
    opening = [sdxl.method(m) for m in sdxl.default_methods]  # the panels the page opens with
    plan = fetch.plan(opening, fetch.CacheListing())
    preload = card.data.to_dict()["preload_from_hub"]
    assert preload == plan.preload_from_hub()
    assert card.data.models == plan.repos == list(dict.fromkeys(r for m in opening for r in m.repos))
    for entry in preload:  # "repo_id file1,file2": the Spaces build fetches only these files
        repo, files = entry.split(" ")
        validate_repo_id(repo)
        assert all(name and not name.startswith("/") for name in files.split(","))
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"


def test_space_card_option_prints_the_lines_the_card_holds(online, server, capsys):
    from huggingface_hub import SpaceCard

    assert main(["download", "--family", "sdxl", "--space-card"]) == 0
    printed = capsys.readouterr().out
    front_matter = (ROOT / "README.md").read_text().split("---\n")[1]
    assert printed in front_matter
    assert main(["download", "--family", "sdxl", "--dry-run"]) == 0
    listed = {line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("    ")}
    card = SpaceCard.load(ROOT / "README.md")
    preloaded = {f"{e.split(' ')[0]}/{name}" for e in card.data.to_dict()["preload_from_hub"]
                 for name in e.split(" ")[1].split(",")}
    assert preloaded == listed
