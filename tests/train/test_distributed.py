"""2 processes under torchrun (gloo on CPU) train like 1 process with the same global batch, and resume."""

import socket
import subprocess
import sys


from test_pretrain import losses, make_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(recipe, out, nproc: int, stop_after_kill: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "qwen2", "train", "pretrain", "--recipe", str(recipe),
               "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, byte_tokenizer):
    from qwen2.train.pretrain import run
    from qwen2.train.recipe import load_recipe

    single = make_recipe(tmp_path, byte_tokenizer, general=6, save_every=3)
    text = single.read_text().replace('dtype = "bfloat16"', 'dtype = "float32"')
    single.write_text(text)
    run(load_recipe(single), tmp_path / "one", progress=False)  # micro 2 x accumulation 2 = 4 rows a step
    double = tmp_path / "ddp.toml"
    double.write_text(text.replace("grad_accum = 2", "grad_accum = 1"))  # micro 2 x 2 processes = 4 rows
    result = torchrun(double, tmp_path / "two", nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two]
    for (step, a, va), (_, b, vb) in zip(one, two):
        # float32; the only difference is the order of the sums (across processes vs micro-batches)
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4), (step, a, b)
        assert (va is None) == (vb is None) and (va is None or abs(va - vb) < 1e-4), (step, va, vb)
    # and a 2-process run resumes from its checkpoint: cut the finished run back to step 6 and go on
    import shutil

    kept = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000008"]
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_00000008")
    shutil.rmtree(tmp_path / "two" / "model")
    result = torchrun(double, tmp_path / "two", nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout + result.stderr and result.stdout.count("step 8:") == 1
    assert losses(tmp_path / "two") == two


def test_fsdp_matches_one_process_and_resumes_from_sharded_checkpoints(tmp_path, byte_tokenizer):
    from qwen2.train.pretrain import run
    from qwen2.train.recipe import load_recipe

    single = make_recipe(tmp_path, byte_tokenizer, general=6, save_every=3)
    text = single.read_text().replace('dtype = "bfloat16"', 'dtype = "float32"')
    single.write_text(text)
    run(load_recipe(single), tmp_path / "one", progress=False)
    fsdp = tmp_path / "fsdp.toml"
    fsdp.write_text(text.replace("grad_accum = 2", 'grad_accum = 1\nparallel = "fsdp"'))
    result = torchrun(fsdp, tmp_path / "fsdp", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    for (step, a, va), (_, b, vb) in zip(one, two, strict=True):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4), (step, a, b)
        assert (va is None) == (vb is None) and (va is None or abs(va - vb) < 1e-4), (step, va, vb)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_00000006"
    assert (checkpoint / "sharded").is_dir() and len(list((checkpoint / "sharded").glob("*.distcp"))) == 2
    import shutil

    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step_00000008")
    shutil.rmtree(tmp_path / "fsdp" / "model")
    result = torchrun(fsdp, tmp_path / "fsdp", nproc=2)
    assert result.returncode == 0 and "resuming" in result.stdout + result.stderr, result.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == two
    from qwen2.checkpoint import load_pretrained

    assert load_pretrained(tmp_path / "fsdp" / "model").model.config.rope_theta == 100000.0  # gathered export
