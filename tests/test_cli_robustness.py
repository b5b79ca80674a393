"""The CLI behaves as a Unix tool should at its edges: `-o`/`--into` write through symlinks and into devices and FIFOs
without replacing them, keep a file's mode, and never leave half a file; a closed pipe on stdout ends it quietly."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from melange_sky._io import write_bytes, write_json, write_text
from melange_sky.errors import OutputError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PATH = str(REPO / "examples" / "example.json")


def test_an_output_through_a_symlink_rewrites_its_target_and_leaves_the_link(cli, tmp_path, example, write_config):
    config = write_config(example)
    (tmp_path / "real.json").write_text("old\n")
    (tmp_path / "link.json").symlink_to("real.json")
    result = cli("solve", config, "-o", "link.json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "link.json").is_symlink()
    assert os.readlink(tmp_path / "link.json") == "real.json"
    assert "A10G" in json.loads((tmp_path / "real.json").read_text())


def test_a_dangling_symlink_is_written_through_to_the_file_it_names(tmp_path):
    (tmp_path / "link").symlink_to("made.txt")
    write_text(tmp_path / "link", "new\n")
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "made.txt").read_text() == "new\n"


def test_a_replaced_file_keeps_its_mode(tmp_path):
    secret = tmp_path / "config.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    write_json(secret, {"a": 1})
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert json.loads(secret.read_text()) == {"a": 1}


def test_a_new_file_gets_the_umask_mode_as_a_redirection_would(tmp_path):
    umask = os.umask(0o027)
    try:
        write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
def test_a_replaced_file_keeps_its_owner_when_run_as_root(tmp_path):
    path = tmp_path / "theirs.json"
    path.write_text("{}")
    os.chown(path, 4321, 4322)
    write_text(path, "[]")
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4322)


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_bytes(fifo, b"through the pipe\n")
    reader.join(timeout=60)
    assert received == [b"through the pipe\n"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dev_null_is_written_into_not_replaced():
    before = os.stat("/dev/null")
    write_text("/dev/null", "discarded\n")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_rdev, after.st_ino) == (before.st_rdev, before.st_ino)


def test_a_process_stream_redirected_to_a_file_is_written_in_place(tmp_path):
    """/dev/stdout with stdout redirected to a file resolves to that regular file: replacing it would leave the
    shell's descriptor on the old one, so it is written through the descriptor instead (here /proc/self/fd/N)."""
    out = tmp_path / "redirected.txt"
    with open(out, "w") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        write_text(f"/proc/self/fd/{handle.fileno()}", "via the stream\n")
    assert out.stat().st_ino == inode
    assert out.read_text() == "via the stream\n"


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old\n")

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_directory_given_as_the_output_is_one_line_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write .*: Is a directory"):
        write_text(tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_on_stdout_ends_the_command_quietly(tmp_path):
    """`melange-sky ... | head -1`: the reader is gone before the command writes; no 'internal error', no
    'Exception ignored' at shutdown, exit code 1 (Click's and Python's own for EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "melange_sky", "catalog", "A10G"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 1


@pytest.mark.parametrize("args, message", [
    (["--tpot-slo-ms", "100"], "--tpot-slo-ms applies to --simulate's traffic only"),
    (["--ttft-slo-ms", "5", "--latency-slo-ms", "9"], "--ttft-slo-ms/--latency-slo-ms applies to --simulate's"),
    (["--rates", "1,2", "--rate", "5"], "--rate only sets the rate the default range is built from, and --rates "
                                        "replaces that range"),
    (["--from", "1", "--to", "4", "--rate", "5"], "and --to replaces that range"),
])
def test_a_sweep_flag_that_would_be_ignored_is_a_usage_error(cli, args, message):
    result = cli("sweep", EXAMPLE_PATH, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {args[0] if 'slo' in args[0] else '--rate'}") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_sweep_rate_still_builds_the_default_range(cli):
    result = cli("sweep", EXAMPLE_PATH, "--rate", "5", "--steps", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert [p["rate"] for p in json.loads(result.stdout)["points"]] == [5, 10]


def test_a_solver_path_with_solver_highs_is_refused_not_run_on_cbc(cli):
    result = cli("solve", EXAMPLE_PATH, "--solver", "highs", "--solver-path", "/usr/bin/cbc")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: --solver-path names a CBC binary, and --solver highs runs HiGHS")
    assert result.stdout == ""


def test_sweep_rates_of_a_range_print_with_the_tables_decimals(cli):
    result = cli("sweep", EXAMPLE_PATH, "--from", "1", "--to", "12", "--steps", "8")
    assert result.exit_code == 0, result.stderr
    assert "8 rate(s), 1.00 to 12.00 req/s" in result.stdout
    rates = [line.split()[0] for line in result.stdout.splitlines()[3:11]]
    assert rates == ["1.00", "2.57", "4.14", "5.71", "7.29", "8.86", "10.43", "12.00"]
    small = cli("sweep", EXAMPLE_PATH, "--rates", "0.001,0.0015,0.002")
    assert [line.split()[0] for line in small.stdout.splitlines()[3:6]] == ["0.0010", "0.0015", "0.0020"]


def test_bucket_edge_help_names_each_commands_own_default(cli):
    replay = cli("replay", "--help").stdout
    assert "--into" not in replay and "(default: Mélange's" in " ".join(replay.split())
    workload = " ".join(cli("workload", "--help").stdout.split())
    assert "(default: those of the config (--into), else Mélange's 1,25,100,250,500,1000,2000)" in workload
    profile = " ".join(cli("profile", "--help").stdout.split())
    assert "(default: those of the config (--config, else --into), else Mélange's" in profile


def test_down_of_a_fleet_not_in_the_ledger_is_a_documented_no_op_while_status_is_an_error(cli):
    """As `sky down` with a cluster it does not know: a retried or scripted teardown succeeds, and says so."""
    down = cli("down", "nosuch-fleet", "-y")
    assert down.exit_code == 0, down.stderr
    assert down.stdout == "Fleet nosuch-fleet is not in the ledger: nothing to tear down.\n"
    assert cli("status", "nosuch-fleet").exit_code == 2
    help_text = " ".join(cli("down", "--help").stdout.split())
    assert "A FLEET the ledger does not hold (already down, or never up" in help_text
    assert "Exit codes: 0 every fleet named is gone (or was not in the ledger), 1 a teardown failed" in help_text
