"""A shared run store a colleague can write into: nothing read from the store is resolved, no
credential is written, no path taken from a file leaves the sweep's runs root, no folder of
another user's is used unless the store says so (docs/runs.md "Shared run stores").

The second part plays a colleague as a second Unix user (`adam-attacker`) against a victim
(`adam-victim`), both in the group `adam-share`; .ci/run creates them. Not root, or without
them, those tests skip and say why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, StoreError
from pipeline.runs import redact
from pipeline.runs.files import private_folder
from pipeline.runs.ids import run_id
from pipeline.runs.integrity import check
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, TINY, make_cfg

SMALL = [*TINY, "train.max_steps=4"]


def test_a_planted_interpolation_in_config_yaml_is_never_resolved(tmp_path, monkeypatch):
    """config.yaml holding ${oc.env:AWS_SECRET_ACCESS_KEY}: flagged damaged, the secret in no
    line the tools print and in no file the analysis writes."""
    from analysis.__main__ import analyze

    secret = "s3cr3t-value-4242"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    run.config.write_text(run.config.read_text().replace("name: cnn", "name: ${oc.env:AWS_SECRET_ACCESS_KEY}"))
    health = check(run)
    assert "config.yaml: model.name is an interpolation" in health.summary() and secret not in health.summary()
    paths = analyze(tmp_path / "runs", figures=False)
    for p in paths["summary"].parent.iterdir():
        assert secret not in p.read_bytes().decode(errors="replace"), p


def test_credentials_are_masked_in_every_file_a_run_writes(tmp_path):
    cfg = make_cfg([*SMALL, "+logger.api_key=KEY-abc-123", "+logger.url=https://bob:hunter2@example.com/p"],
                   runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    for p in run.path.iterdir():
        text = p.read_bytes().decode(errors="replace")
        assert "KEY-abc-123" not in text and "hunter2" not in text, p
    assert check(run).whole  # the masked config.yaml still hashes to the run id
    assert run_id(cfg) == run_id(make_cfg(SMALL, runs=tmp_path / "runs"))  # a credential is no part of the id


def test_an_environment_variable_in_a_semantic_key_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.h: an environment variable"):
        from pipeline.config.validate import validate

        validate(make_cfg([*SMALL, "optim.h=${oc.env:SOME_H,0.1}"]))


@pytest.mark.parametrize("args,masked", [
    (["+logger.api_key=abc"], ["+logger.api_key=***"]),
    (["--api-key", "abc", "x"], ["--api-key", "***", "x"]),
    (["data.root=https://u:pw@host/x"], ["data.root=https://u:***@host/x"]),
    (["model.tokenizer=bert", "max_tokens=3"], ["model.tokenizer=bert", "max_tokens=3"]),
])
def test_redaction_of_a_command_line(args, masked):
    assert redact.argv(args) == masked


def test_redaction_of_a_diff():
    diff = '+API_KEY = "sk-live-1"\n+url = "https://bob:hunter2@example.com/x"\n+h = 0.1\n'
    out = redact.text(diff)
    assert "sk-live-1" not in out and "hunter2" not in out and "+h = 0.1" in out


def test_a_private_folder_that_is_a_link_or_not_mine_is_refused(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".submitit").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="a link"):
        private_folder(tmp_path / ".submitit")
    mine = private_folder(tmp_path / "ok")
    assert mine.stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(os, "getuid", lambda: mine.stat().st_uid + 1)  # as another user would see it
    with pytest.raises(StoreError, match="owned by"):
        private_folder(mine)


def test_the_plan_json_holds_no_credential(tmp_path):
    from pipeline.dispatch.plan import make_plan, register

    plan = make_plan("synthetic", [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps",
                                   "+logger.api_key=KEY-zzz"])
    register(plan)
    text = (tmp_path / "sweeps" / "synthetic" / "plan.json").read_text()
    assert "KEY-zzz" not in text and "+logger.api_key=***" in text
    assert all("KEY-zzz" not in p.read_text() for p in (tmp_path / "runs").rglob("*.yaml"))
    json.loads(text)


def test_make_sync_lists_only_the_offline_runs_of_the_sweeps_own_runs(tmp_path, capsys):
    """An offline wandb run planted in a run folder that the sweep's plan does not name is never
    uploaded with your credentials: `where --wandb` (what `make sync` sends) lists the plan's only."""
    from pipeline.dispatch import sweep as sweep_mod
    from pipeline.dispatch.plan import make_plan, register

    paths = [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps"]
    plan = make_plan("synthetic", paths)
    register(plan)
    ours = plan.points[0].run.path / "wandb" / "offline-run-20261206_000000-abc"
    ours.mkdir(parents=True)
    planted = tmp_path / "runs" / "0123456789ab" / "wandb" / "offline-run-20261206_000000-evil"
    planted.mkdir(parents=True)
    assert sweep_mod.main(["where", "synthetic", "--wandb", "--", *paths]) == 0
    assert capsys.readouterr().out.split() == [str(ours)]


# -- ownership and modes (runs/owners.py) ------------------------------------------------------------
def test_a_run_folder_of_another_user_is_neither_trained_nor_counted_unless_trusted(tmp_path, monkeypatch):
    from pipeline.runs import owners

    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    assert run.path.stat().st_mode & 0o7777 == 0o700 and (run.path / "status.json").stat().st_mode & 0o777 == 0o600
    mine = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: mine + 4242)  # the folder is now another user's
    health = check(run)
    assert health.foreign and "owned by" in health.summary() and "store.trust" in health.summary()
    with pytest.raises(StoreError, match="owned by"):
        RunDir(cfg.paths.runs, run.id).create(cfg)
    try:
        owners.configure({"trust": [str(mine)]})
        assert not check(run).foreign and check(run).whole
    finally:
        owners.configure({})


def test_a_folder_others_may_write_into_is_refused_unless_the_store_is_shared(tmp_path):
    import grp

    from pipeline.runs import owners

    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    os.chmod(run.path, 0o777)
    assert "writable by every user" in check(run).summary()
    os.chmod(run.path, 0o770)
    assert "store.group does not declare" in check(run).summary()
    group = grp.getgrgid(run.path.stat().st_gid).gr_name
    try:
        owners.configure({"group": group})
        assert check(run).whole
    finally:
        owners.configure({})


def test_store_settings_are_checked_before_anything_runs():
    from pipeline.config.validate import validate

    with pytest.raises(ConfigError, match="store.trust: no user 'no-such-user-x'"):
        validate(make_cfg([*SMALL, "store.trust=[no-such-user-x]"]))
    with pytest.raises(ConfigError, match="store.group: no group"):
        validate(make_cfg([*SMALL, "store.group=no-such-group-x"]))


def test_a_job_pickle_holds_no_credential_and_the_job_gets_it_back(tmp_path, monkeypatch):
    import pickle

    from omegaconf import OmegaConf

    cfg = make_cfg([*SMALL, "+logger.api_key=KEY-pickle-77", "+logger.token=${oc.env:SOME_TOKEN,x}"])
    masked, names = redact.for_job(cfg)
    assert b"KEY-pickle-77" not in pickle.dumps(masked) and names == {"logger.api_key": names["logger.api_key"]}
    assert OmegaConf.to_container(masked)["logger"]["token"] == "${oc.env:SOME_TOKEN,x}"  # resolved in the job
    assert redact.restore(masked, names).logger.api_key == "KEY-pickle-77"
    monkeypatch.delenv(names["logger.api_key"])
    with pytest.raises(ConfigError, match="logger.api_key: the job's environment lacks ADAM_CREDENTIAL_"):
        redact.restore(masked, names)


# -- a colleague as a second Unix user -------------------------------------------------------------
VICTIM, ATTACKER, GROUP = "adam-victim", "adam-attacker", "adam-share"
FAST2 = "train.max_steps=4 data.n_train=64 data.n_test=32"
SECRETS = dict(env="envsecret-6b1f0c", cli="clisecret-93ad2e", wandb="wandbkey-0f7c11")


def _second_user_problem() -> str | None:
    import grp
    import pwd
    import subprocess
    import sys

    if os.getuid() != 0:
        return "not root: these tests switch between two Unix users (CI runs them as root)"
    try:
        pwd.getpwnam(VICTIM), pwd.getpwnam(ATTACKER), grp.getgrnam(GROUP)
    except KeyError:
        return (f"no users {VICTIM}, {ATTACKER} in a group {GROUP} (.ci/run makes them: groupadd {GROUP}; "
                f"useradd -m -G {GROUP} {VICTIM}; useradd -m -G {GROUP} {ATTACKER})")
    try:
        probe = subprocess.run([sys.executable, "-c", "import pipeline, analysis"], user=VICTIM, cwd="/",
                               group=pwd.getpwnam(VICTIM).pw_gid, extra_groups=[],
                               capture_output=True, text=True, env=dict(PATH=os.environ["PATH"]))
    except OSError as e:
        return f"{VICTIM} cannot run {sys.executable} ({e.strerror}; .ci/run makes the folders above it traversable)"
    if probe.returncode:
        return f"{VICTIM} cannot run {sys.executable} on this checkout: {probe.stderr.strip()[-200:]}"
    return None


second_user = pytest.mark.skipif(_second_user_problem() is not None, reason=str(_second_user_problem()))


class Store:
    """A shared folder (group adam-share, 2770, as a project directory is), the victim's decoy
    home, a marker the attacker's code would create, and the commands of both users."""

    def __init__(self, tmp):
        import grp
        import pwd
        import tempfile

        self.gid = grp.getgrnam(GROUP).gr_gid
        self.victim, self.attacker = pwd.getpwnam(VICTIM), pwd.getpwnam(ATTACKER)
        self.base = Path(tempfile.mkdtemp(prefix="adam-shared-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.shared = self.base / "project"
        self.shared.mkdir()
        os.chown(self.shared, 0, self.gid)
        os.chmod(self.shared, 0o2770)
        self.home = self.base / "home"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".bashrc").write_text("# the victim's shell start-up\n")
        (self.home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA victim\n")
        self.scratch = self.base / "scratch"  # caches of the victim's processes: not the decoy home
        self.scratch.mkdir()
        for p in [self.home, *self.home.rglob("*"), self.scratch]:
            os.chown(p, self.victim.pw_uid, self.victim.pw_gid)
        self.marker = self.base / "open" / "PWNED"
        self.marker.parent.mkdir()
        os.chmod(self.marker.parent, 0o1777)
        self.before = self.home_hash()

    def home_hash(self) -> dict:
        return {str(p.relative_to(self.home)): (p.read_bytes() if p.is_file() and not p.is_symlink() else
                                                 f"link {os.readlink(p)}" if p.is_symlink() else "dir")
                for p in sorted(self.home.rglob("*"))}

    def env(self, **more) -> dict:
        return dict(PATH=os.environ["PATH"], HOME=str(self.home), OMP_NUM_THREADS="1", WANDB_MODE="offline",
                    WANDB_SILENT="true", XDG_CACHE_HOME=str(self.scratch), MPLCONFIGDIR=str(self.scratch / "mpl"),
                    WANDB_CONFIG_DIR=str(self.scratch / "wandb"), WANDB_CACHE_DIR=str(self.scratch / "wandb-cache"),
                    AWS_SECRET_ACCESS_KEY=SECRETS["env"], WANDB_API_KEY=SECRETS["wandb"], **more)

    def make(self, target, extra="", launcher="basic", retry=0, timeout=900, **more):
        import subprocess

        return subprocess.run(["make", "-s", "-C", str(ROOT), target, "SWEEP=synthetic", f"LAUNCHER={launcher}",
                               f"RUNS={self.shared}/runs", f"SWEEPS={self.shared}/sweeps",
                               f"EXTRA={FAST2} {extra}".strip(), f"RETRY={retry}", "JOBS=2", "NAME=synthetic",
                               *[f"{k}={v}" for k, v in more.items()]],
                              user=self.victim.pw_uid, group=self.victim.pw_gid, extra_groups=[self.gid],
                              cwd=self.scratch, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def as_attacker(self, path: Path, data: bytes | None = None, link: str | None = None, folder=False, mode=0o664):
        """What the attacker leaves at `path` (a folder, a file, or a link), owned by them."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            path.mkdir(exist_ok=True)
            os.chmod(path, 0o2770)
        elif link is not None:
            path.unlink(missing_ok=True)
            path.symlink_to(link)
        else:
            path.unlink(missing_ok=True)
            path.write_bytes(data)
            os.chmod(path, mode)
        os.chown(path, self.attacker.pw_uid, self.gid, follow_symlinks=False)

    def payload(self) -> bytes:
        """A pickle that creates the marker when it is loaded."""
        import pickle

        class Payload:
            def __reduce__(s):
                return (os.system, (f"touch {self.marker}",))
        return pickle.dumps(Payload())

    def ids(self) -> list[str]:
        from pipeline.config.compose import Composer
        from pipeline.config.validate import validate_grid

        with Composer() as c:
            points = validate_grid(c, ["sweep=synthetic", *FAST2.split(), f"paths.runs={self.shared}/runs"])
        return sorted(run_id(cfg) for _, cfg in points)

    def assert_safe(self, *outputs):
        """No code of the attacker's ran, nothing of the victim's home changed, no secret in any
        file of the store (pickles, logs, wandb's offline files), no forged line, no traceback."""
        assert not self.marker.exists(), "the attacker's code ran as the victim"
        assert self.home_hash() == self.before, "a file of the victim's home changed"
        for p in self.shared.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                for name, value in SECRETS.items():
                    assert value.encode() not in data, f"the {name} secret is in {p}"
        for out in outputs:
            assert "Traceback" not in out and "\nFORGED" not in out, out[-2000:]

    def close(self):
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


def _state(run: Path) -> str:
    return json.loads((run / "status.json").read_text())["state"]


@second_user
@pytest.mark.slow
def test_a_colleagues_planted_run_folder_is_refused_and_nothing_of_yours_is_touched(store):
    """A private store (no store.trust): the attacker pre-creates one run folder of the sweep (the
    id is a hash of the config) with results and links into the victim's home; the victim's sweep
    refuses that run in one line, trains the others, and neither status nor the analysis counts
    it. The victim passes credentials on the command line and in the environment: none is
    written anywhere (job pickles and wandb's offline files included)."""
    ids = store.ids()
    planted = store.shared / "runs" / ids[0]
    store.as_attacker(store.shared / "runs", folder=True)
    os.chown(store.shared / "runs", store.victim.pw_uid, store.gid)  # the victim's runs root, group-writable
    store.as_attacker(planted, folder=True)
    store.as_attacker(planted / "status.json", json.dumps(dict(state="completed", step=3, run_id=ids[0])).encode())
    store.as_attacker(planted / "metrics.csv", link=str(store.home / ".bashrc"))
    store.as_attacker(planted / "train.log", link=str(store.home / ".bashrc"))
    store.as_attacker(planted / "checkpoint.pt", store.payload())
    store.as_attacker(planted / "config.yaml", b"model:\n  name: ${oc.env:AWS_SECRET_ACCESS_KEY}\n")
    r = store.make("sweep", f"+logger.api_key={SECRETS['cli']} logger=wandb", launcher="local")
    assert r.returncode != 0 or "owned by" in r.stdout + r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ids[0] in ln and f"owned by {ATTACKER}" in ln]
    assert lines, r.stdout + r.stderr
    for i in ids[1:]:
        assert _state(store.shared / "runs" / i) == "completed", r.stdout + r.stderr
    st = store.make("status")
    assert "3 completed" in st.stdout and f"owned by {ATTACKER}" in st.stdout, st.stdout + st.stderr
    a = store.make("analyze", ARGS="--no-figures")
    assert a.returncode == 0, a.stderr
    import pandas as pd

    summary = pd.read_csv(store.shared / "sweeps" / "synthetic" / "analysis" / "summary.csv")
    row = summary[summary.run_id == ids[0]]
    assert len(row) == 0 or row.damaged.notna().all()  # never counted as a result
    assert (summary[summary.run_id != ids[0]].state == "completed").sum() == 3
    assert any((store.shared / "runs" / i / "wandb").is_dir() for i in ids[1:])  # wandb's offline files exist
    store.assert_safe(r.stdout, r.stderr, st.stdout, st.stderr, a.stdout, a.stderr)


@second_user
@pytest.mark.slow
def test_a_colleagues_submitit_folder_and_sweep_folder_are_refused(store):
    """The attacker pre-creates the sweep folder (and in a declared shared store, where their
    folder is trusted, its `.submitit/` with a job pickle that would run their code): the
    victim's sweep is refused in one line naming the folder; no code of theirs runs."""
    store.as_attacker(store.shared / "sweeps", folder=True)
    sweep = store.shared / "sweeps" / "synthetic"
    store.as_attacker(sweep, folder=True)
    store.as_attacker(sweep / ".submitit", folder=True)
    for name in ("1_submitted.pkl", "%j/1_submitted.pkl"):
        store.as_attacker(sweep / ".submitit" / name, store.payload())
    r = store.make("sweep", launcher="local")
    assert r.returncode != 0 and f"{sweep}: owned by {ATTACKER}" in r.stderr, r.stdout + r.stderr
    shared = store.make("sweep", f"store.group={GROUP}", launcher="local")
    assert shared.returncode != 0 and f"{sweep}/.submitit: owned by another user" in shared.stderr, shared.stderr
    store.assert_safe(r.stdout, r.stderr, shared.stdout, shared.stderr)


@second_user
@pytest.mark.slow
def test_in_a_declared_shared_store_planted_files_cost_only_their_runs(store):
    """store.group=adam-share: the attacker is a trusted member, and pre-creates the four run
    folders of the sweep with one planted file each -- a lock file held open read-only with a
    lease record from another host that claims to be live for 1e308 s and whose host name forges
    a log line; a train.log linked to the victim's .bashrc; a metrics.csv linked to the victim's
    authorized_keys; a config.yaml that would look the victim's secret up. The two runs with
    a link are refused (one line each, nothing written through the link); the other two train,
    and the one with the planted config.yaml is retrained from step 0 with RETRY=1."""
    ids = store.ids()
    store.as_attacker(store.shared / "runs", folder=True)
    runs = [store.shared / "runs" / i for i in ids]
    for r in runs:
        store.as_attacker(r, folder=True)
    import socket
    import subprocess
    import sys
    import time

    lock = runs[0] / f"lease.{socket.gethostname()}.lock"
    store.as_attacker(lock, b"", mode=0o644)
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH); "
            "print('held', flush=True); time.sleep(900)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)],
                              user=store.attacker.pw_uid, group=store.attacker.pw_gid, extra_groups=[store.gid],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        record = dict(host="node9\nFORGED line", pid=1, start=0, slurm_job=None, since="2026-12-06T00:00:00+0000",
                      timeout_s=1e308, heartbeat_s=30, generation=1, token="0" * 16)
        store.as_attacker(runs[0] / "lease.json", json.dumps(record).encode())
        old = time.time() - 3600
        os.utime(runs[0] / "lease.json", (old, old), follow_symlinks=False)
        store.as_attacker(runs[1] / "train.log", link=str(store.home / ".bashrc"))
        store.as_attacker(runs[2] / "metrics.csv", link=str(store.home / ".ssh" / "authorized_keys"))
        store.as_attacker(runs[3] / "config.yaml", b"model:\n  name: ${oc.env:AWS_SECRET_ACCESS_KEY}\n")
        store.as_attacker(runs[3] / "status.json", json.dumps(dict(state="completed", step=3, run_id=ids[3])).encode())
        first = store.make("sweep", f"store.group={GROUP}")
        out = first.stdout + first.stderr
        assert _state(runs[0]) == "completed", out  # the planted lock and lease held nothing
        for r in runs[1:3]:  # one line each: a link refused, or the run damaged (no config.yaml beside the link)
            assert any(r.name in ln and ("a link" in ln or "damaged" in ln) for ln in out.splitlines()), out
        assert any(ids[3] in ln and "config.yaml" in ln for ln in out.splitlines()), out  # flagged, not trained over
        again = store.make("sweep", f"store.group={GROUP}", retry=1)
        out = again.stdout + again.stderr
        from pipeline.runs import owners

        try:
            owners.configure({"group": GROUP})  # as the victim sees the store
            assert _state(runs[3]) == "completed" and check(RunDir(runs[3].parent, ids[3])).whole, out
        finally:
            owners.configure({})
        for r in runs[1:3]:  # RETRY=1 would write: the link is refused, in one line, and the run left as it is
            assert any(r.name in ln and "a link where the run's file must be" in ln for ln in out.splitlines()), out
            assert not (r / "status.json").exists() or _state(r) != "completed"
        log = (runs[0] / "train.log").read_text()
        assert "FORGED" in log and not any(ln.startswith("FORGED") for ln in log.splitlines())  # shown escaped
        assert (runs[0] / "status.json").stat().st_mode & 0o777 == 0o660 and \
            runs[0].joinpath("status.json").stat().st_gid == store.gid  # the shared store's modes
        store.assert_safe(first.stdout, first.stderr, again.stdout, again.stderr)
    finally:
        holder.kill()
        holder.wait()


def test_a_link_planted_in_the_analysis_folder_is_replaced_never_written_through(tmp_path):
    """A shared store (the output folder writable by its group): whoever planted summary.csv,
    a figure or columns.md as links to a file of yours finds them replaced by the analysis's own
    files; the file they pointed at is byte-for-byte unchanged."""
    import grp

    from analysis.__main__ import analyze
    from pipeline.runs import owners

    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    decoy = tmp_path / "home" / ".bashrc"
    decoy.parent.mkdir()
    decoy.write_text("# yours\n")
    out = tmp_path / "out"
    out.mkdir()
    names = ("summary.csv", "groups.csv", "columns.md", "curves.csv", "summary.parquet")
    for name in names:
        (out / name).symlink_to(decoy)
    owners.configure({"group": grp.getgrgid(os.getgid()).gr_name})
    os.chmod(out, 0o2770)
    analyze(tmp_path / "runs", out, figures=False, csv=True)
    assert decoy.read_text() == "# yours\n"
    for name in names:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
