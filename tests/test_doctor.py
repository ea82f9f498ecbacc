"""`prealloc doctor`: each answer checked against what the test reads from the OS itself
(getrlimit, CapEff, sysfs, /proc, access(2)), and in children made less privileged
(a lower RLIMIT_MEMLOCK / RLIMIT_RTPRIO, a dropped capability, the unprivileged pa-user)
the answers turn to no with the reason."""
from __future__ import annotations

import io
import json
import os
import pwd
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from osutil import has_capability
from prealloc import cli, doctor

MiB = 1 << 20
CAP_NET_ADMIN, CAP_IPC_LOCK, CAP_SYS_NICE = 12, 14, 23


def by_name(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["checks"]}


def run_doctor(*args: str, preexec=None, user: str | None = None, env: dict | None = None,
               check_rc: int | None = 0) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "prealloc", "doctor", "--json", *args], capture_output=True,
                          text=True, timeout=120, preexec_fn=preexec, user=user, env=env)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict[str, dict]:
    directory = tmp_path_factory.mktemp("doctor-journal")
    _, data = run_doctor("--dir", str(directory), "--socket", str(directory / "no.sock"))
    assert data["schema"] == doctor.SCHEMA_VERSION and data["uid"] == os.geteuid()
    return by_name(data)


def test_every_no_has_a_reason_and_every_check_its_fields(answers):
    expected = {"memory_reservation", "madv_populate_write", "mlock", "mlock_beyond_limit",
                "transparent_huge_pages", "cpu_affinity", "cachestat", "psi", "psi_trigger", "cgroups",
                "cpuset_writable", "isolated_cpus", "rt_scheduling", "nvml", "cuda", "cap_net_admin", "iproute2",
                "network_bandwidth", "journal_directory", "core_registry", "broker"}
    assert set(answers) == expected
    for check in answers.values():
        assert set(check) == {"name", "ok", "detail", "reason", "required", "facts"}
        assert isinstance(check["ok"], bool)
        if not check["ok"]:
            assert check["reason"], f"{check['name']} says no without a reason"
    assert {n for n, c in answers.items() if c["required"]} == {"memory_reservation", "cpu_affinity",
                                                                 "journal_directory"}


def test_mlock_matches_getrlimit_and_capeff(answers):
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap = has_capability(CAP_IPC_LOCK)
    facts = answers["mlock_beyond_limit"]["facts"]
    assert facts["rlimit_memlock_soft"] == (None if soft == resource.RLIM_INFINITY else soft)
    assert facts["rlimit_memlock_hard"] == (None if hard == resource.RLIM_INFINITY else hard)
    assert facts["cap_ipc_lock"] is cap
    assert answers["mlock_beyond_limit"]["ok"] is (cap or soft == resource.RLIM_INFINITY)
    if cap or soft >= 2 * os.sysconf("SC_PAGE_SIZE"):
        assert answers["mlock"]["ok"] is True  # one page fits


def drop_for_exec(cap: int) -> None:
    """Drops cap from this (forked) process so that the program it execs lacks it too:
    root regains every capability of the bounding set at exec, so the cap leaves that set
    as well as the effective, permitted and inheritable ones. An unprivileged process may
    not change its bounding set (EPERM), and holds no cap to lose at exec anyway."""
    import ctypes

    from osutil import drop_capability

    pr_capbset_drop = 24
    ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap, 0, 0, 0)
    drop_capability(cap)


def _less_privileged():
    """A child limited like an ordinary user: 8 MiB to lock, no real-time priority, and
    without CAP_IPC_LOCK, CAP_SYS_NICE and CAP_NET_ADMIN."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 * MiB, 8 * MiB))
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    for cap in (CAP_IPC_LOCK, CAP_SYS_NICE, CAP_NET_ADMIN):
        drop_for_exec(cap)


def test_a_less_privileged_child_is_told_why(tmp_path):
    _, data = run_doctor("--dir", str(tmp_path), "--socket", str(tmp_path / "no.sock"), preexec=_less_privileged)
    checks = by_name(data)
    check = checks["mlock_beyond_limit"]
    assert check["ok"] is False
    assert check["facts"]["rlimit_memlock_soft"] == 8 * MiB and check["facts"]["cap_ipc_lock"] is False
    assert "RLIMIT_MEMLOCK is 8388608 bytes (8 MiB)" in check["reason"] and "CAP_IPC_LOCK" in check["reason"]
    assert checks["mlock"]["ok"] is True  # one page is within 8 MiB
    assert checks["rt_scheduling"]["ok"] is False and checks["rt_scheduling"]["facts"]["probe_errno"] != 0
    assert "RLIMIT_RTPRIO is 0" in checks["rt_scheduling"]["reason"]
    assert checks["cap_net_admin"]["ok"] is False and "CAP_NET_ADMIN" in checks["cap_net_admin"]["reason"]
    assert checks["network_bandwidth"]["ok"] is False and checks["network_bandwidth"]["reason"]


def _interpreter_for(user: pwd.struct_passwd, env: dict) -> list[str]:
    """The start of a command line, ``[*prefix, "prealloc", ARGS...]``, that runs this
    build's prealloc as `user`: this interpreter with -m, or — where it lives under a directory the user
    cannot enter (a pyenv in /root) — the system's interpreter of the same version with
    this venv's site-packages added (their .pth files, the editable install's hook among
    them, processed). Skips, saying why, when neither starts prealloc as that user."""
    import shutil
    import site

    candidates = [[sys.executable, "-m"]]
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/local/bin:/usr/bin")
    if system is not None:
        boot = (f"import runpy, site, sys; [site.addsitedir(d) for d in {site.getsitepackages()!r}]; "
                "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
        candidates.append([system, "-c", boot])
    why = []
    for prefix in candidates:
        try:
            reach = subprocess.run([*prefix, "prealloc", "--version"], user=user.pw_uid, env=env,
                                   capture_output=True, text=True, timeout=120)
        except PermissionError as exc:
            why.append(f"{prefix[0]}: {exc.strerror}")
            continue
        if reach.returncode == 0:
            return prefix
        why.append(f"{prefix[0]}: {reach.stderr.strip().splitlines()[-1:]}")
    pytest.skip(f"pa-user cannot run this build (chmod -R a+rX the checkout and the venv): {why}")


def test_as_an_unprivileged_user(tmp_path):
    """Doctor run by an unprivileged user — this process when it is one, else pa-user
    (RLIMIT_MEMLOCK 8 MiB, no capabilities): mlock beyond the limit and CAP_NET_ADMIN are
    refused, and (in a root-owned cpuset) cpuset writes, each with its reason; the
    user's own uid is reported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREALLOC_")}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("pa-user")
        except KeyError:
            pytest.skip("no pa-user account on this machine (useradd -m pa-user)")
        env.update(HOME="/tmp")
        command = _interpreter_for(user, env)
        uid, name = user.pw_uid, user.pw_name
    else:
        uid, name, command = os.geteuid(), None, [sys.executable, "-m"]
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if has_capability(CAP_IPC_LOCK) or soft == resource.RLIM_INFINITY:
            pytest.skip("this unprivileged process may lock without limit (CAP_IPC_LOCK or RLIMIT_MEMLOCK unlimited)")

    def limits():
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 * MiB, 8 * MiB))

    done = subprocess.run([*command, "prealloc", "doctor", "--json", "--socket", str(tmp_path / "no.sock")],
                          capture_output=True, text=True, timeout=120, preexec_fn=limits, user=name, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    checks = by_name(data)
    assert data["uid"] == uid
    assert checks["mlock_beyond_limit"]["ok"] is False
    assert "RLIMIT_MEMLOCK is 8388608 bytes (8 MiB)" in checks["mlock_beyond_limit"]["reason"]
    assert "CAP_IPC_LOCK is not held" in checks["mlock_beyond_limit"]["reason"]
    assert checks["cap_net_admin"]["ok"] is False and "CAP_NET_ADMIN" in checks["cap_net_admin"]["reason"]
    cpuset = checks["cpuset_writable"]
    if cpuset["facts"].get("v1_root"):
        st = Path(cpuset["facts"]["v1_root"]).stat()
        if st.st_uid == 0 and not st.st_mode & 0o002:
            assert cpuset["ok"] is False and "owner uid 0" in cpuset["reason"]
            assert f"we are uid {uid}" in cpuset["reason"]


def _doctor_in_process(*argv: str) -> tuple[int, dict]:
    out = io.StringIO()
    rc = doctor.run(as_json=True, strict="--strict" in argv, journal_dir=argv[-1], out=out,
                    socket_path=argv[-1] + ".no-broker.sock")
    return rc, json.loads(out.getvalue())


def test_strict_fails_on_an_untrusted_journal_directory(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    rc, data = _doctor_in_process("--strict", str(good))
    assert rc == (0 if data["strict_ok"] else 1)
    assert by_name(data)["journal_directory"]["ok"] is True
    bad = tmp_path / "bad"
    bad.mkdir()
    os.chmod(bad, 0o777)
    rc, data = _doctor_in_process("--strict", str(bad))
    journal = by_name(data)["journal_directory"]
    assert rc == 1 and data["strict_ok"] is False
    assert journal["ok"] is False and "writable by others" in journal["reason"] and journal["facts"]["mode"] == "777"
    assert _doctor_in_process(str(bad))[0] == 0  # without --strict: the answer, not a failure
    # the command's exit status is doctor.run's
    assert cli.main(["doctor", "--strict", "--dir", str(bad), "--socket", str(tmp_path / "x.sock")]) == 1
    assert "MISSING journal_directory" in capsys.readouterr().out


def test_a_missing_journal_directory_is_creatable_and_not_created(tmp_path):
    missing = tmp_path / "not-yet" / "journal"
    check = doctor.check_journal(missing)
    assert check.ok is True and "will be created" in check.detail
    assert not missing.exists() and not missing.parent.exists()


def _parse_bracketed(path: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def test_thp_psi_isolated_affinity_match_the_kernels_files(answers):
    thp = answers["transparent_huge_pages"]["facts"]
    assert thp["enabled"] == _parse_bracketed("/sys/kernel/mm/transparent_hugepage/enabled")
    assert thp["shmem_enabled"] == _parse_bracketed("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    readable = []
    for name in ("cpu", "memory", "io"):
        try:
            Path(f"/proc/pressure/{name}").read_text()
            readable.append(name)
        except OSError:
            pass
    assert answers["psi"]["ok"] is (len(readable) == 3)
    assert sorted(answers["psi"]["facts"]["readable"]) == sorted(readable)
    try:
        isolated = Path("/sys/devices/system/cpu/isolated").read_text().strip()
    except OSError:
        isolated = ""
    assert answers["isolated_cpus"]["ok"] is bool(isolated)
    assert answers["isolated_cpus"]["facts"]["isolated"] == isolated
    assert answers["cpu_affinity"]["ok"] is True
    assert answers["cpu_affinity"]["facts"]["cpus"] == sorted(os.sched_getaffinity(0))


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = os.uname().release.split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


def test_syscall_probes_follow_the_kernel(answers):
    if _kernel_at_least(5, 14):
        assert answers["madv_populate_write"]["ok"] is True
        assert answers["madv_populate_write"]["facts"]["populate_method"] == "madvise"
    if _kernel_at_least(6, 5):
        assert answers["cachestat"]["ok"] is True
    else:
        assert answers["cachestat"]["ok"] is False and "cachestat" in answers["cachestat"]["reason"]


def test_cgroups_match_mountinfo(answers):
    types = {line.partition(" - ")[2].split()[0] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    versions = ([1] if "cgroup" in types else []) + ([2] if "cgroup2" in types else [])
    assert answers["cgroups"]["facts"]["versions"] == versions
    assert answers["cgroups"]["ok"] is bool(versions)


def _v1_cpuset_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup" and "cpuset" in fields[3].split(","):
            return Path(fields[1])
    return None


def test_cpuset_answer_matches_access_and_writes_nothing(answers):
    check = answers["cpuset_writable"]
    root = _v1_cpuset_mount()
    if root is None:
        assert check["ok"] is False and "cpuset" in check["reason"]
        return
    assert check["facts"]["v1_root"] == str(root)
    assert check["ok"] is os.access(root, os.W_OK | os.X_OK) is check["facts"]["can_create_child"]
    cpus = root / "cpuset.cpus"
    before = (sorted(p.name for p in root.iterdir() if p.is_dir()), cpus.read_text())
    again = doctor.check_cpuset()
    assert again.facts == check["facts"]
    assert (sorted(p.name for p in root.iterdir() if p.is_dir()), cpus.read_text()) == before


def test_rt_scheduling_matches_the_limits(answers):
    soft, hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    facts = answers["rt_scheduling"]["facts"]
    assert (facts["rlimit_rtprio_soft"], facts["rlimit_rtprio_hard"]) == (soft, hard)
    assert facts["cap_sys_nice"] is has_capability(CAP_SYS_NICE)
    assert facts["sched_rt_runtime_us"] == int(Path("/proc/sys/kernel/sched_rt_runtime_us").read_text())
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the probe ran in a child: we are unchanged


def test_cap_net_admin_and_iproute2_match_the_process(answers):
    import shutil

    assert answers["cap_net_admin"]["ok"] is has_capability(CAP_NET_ADMIN)
    assert answers["iproute2"]["facts"]["tc"] == shutil.which("tc")
    assert answers["iproute2"]["ok"] is (shutil.which("tc") is not None and shutil.which("ip") is not None)


def test_gpu_answers_say_why_where_there_is_no_gpu(answers):
    devices = [p for p in Path("/dev").glob("nvidia[0-9]*")]
    if not devices:
        assert answers["nvml"]["ok"] is False and answers["nvml"]["reason"]
        assert answers["cuda"]["ok"] is False and answers["cuda"]["reason"]
    else:
        assert answers["nvml"]["ok"] is True, answers["nvml"]["reason"]


def test_no_broker_at_the_socket_is_a_no_naming_it(answers, tmp_path):
    check = doctor.check_broker(str(tmp_path / "nobody.sock"))
    assert check.ok is False and str(tmp_path / "nobody.sock") in check.detail and check.reason
    assert answers["broker"]["ok"] is False


def test_the_table_gives_every_no_its_reason(tmp_path, capsys):
    assert cli.main(["doctor", "--dir", str(tmp_path), "--socket", str(tmp_path / "no.sock")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prealloc doctor (uid ")
    for i, line in enumerate(lines[1:-1], start=1):
        fields = line.split()
        if fields[0] != "why:" and fields[1] == "no":
            assert lines[i + 1].strip().startswith("why: "), line
    assert lines[-1].startswith("default configuration: ")


def test_core_registry_answer_follows_its_directory(tmp_path):
    machine_registry = pytest.importorskip("prealloc.machine_registry")
    if machine_registry.shared_directory() is not None:
        pytest.skip("PREALLOC_REGISTRY_DIR names a shared registry: the journal directory does not choose it")
    journal_dir = tmp_path / "journal"
    registry_dir = machine_registry.registry_directory_for(journal_dir)
    missing = doctor.check_core_registry(journal_dir)
    assert missing.ok is True and "will be created" in missing.detail and not registry_dir.exists()
    registry_dir.mkdir(mode=0o700)
    lock = machine_registry.MachineCoreRegistry(registry_dir).try_acquire(max(os.sched_getaffinity(0)))
    assert lock is not None
    try:
        held = doctor.check_core_registry(journal_dir)
        assert held.ok is True and held.facts["held"] == 1
    finally:
        lock.release()
    registry_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(registry_dir, 0o777)
    untrusted = doctor.check_core_registry(journal_dir)
    assert untrusted.ok is False and "writable by others" in untrusted.reason
