"""privasr-bench: the cost of each clipping strategy under real DDP, side by side.

Each strategy runs in its own fresh group of gloo (CPU) or nccl (GPU) processes, so peak
memory is that strategy's own. A step is: forward/backward on the local batch, clip and
aggregate, one all_reduce, SGD update. Printed as a markdown table with ratios to ``none``
measured in the same run.

Strategies: ``ddp`` (torch's DistributedDataParallel, for reference), ``none``, ``global``,
``pcc``, ``apcc`` (one core per process, the paper's setting), ``pcc-vK`` (K virtual
cores per process, loop), ``pec-vmap`` and ``pec-loop`` (one core per example).

A row whose worker process dies (a signal, an exit status, an exception) ends the command with one
line ``<prog>: error: row R: worker process N was killed by SIGABRT ...`` and exit status 1
(:func:`spawn_row`), never a traceback; ``PRIVASR_DEBUG=1`` re-raises torch's exception.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from privasr.cli import CliParser, nonnegative_int, output_file, positive_float, positive_int, run_cli
from privasr.distributed import ordered_shutdown
from privasr.results_md import table_lines

PROG = "privasr-bench"
DEFAULT_STRATEGIES = ["ddp", "none", "global", "pcc", "apcc", "pcc-v4", "pec-vmap", "pec-loop"]


def build_model(args, device):
    from privasr.models.conformer_ctc import ConformerCTC

    torch.manual_seed(0)
    return ConformerCTC(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, nhead=args.heads,
                        d_ffn=4 * args.d_model, kernel_size=15, dropout=0.0).to(device)


def make_batch(args, rank, device):
    """Random audio of 70-100% of --seconds and random transcripts (fixed per rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    samples = int(args.seconds * 16000)
    wavs = torch.randn(args.batch, samples, generator=g) * 0.1
    wav_lens = torch.linspace(0.7, 1.0, args.batch)
    tokens = torch.randint(1, args.vocab, (args.batch, args.tokens), generator=g)
    token_lens = torch.linspace(0.6, 1.0, args.batch)
    return [t.to(device) for t in (wavs, wav_lens, tokens, token_lens)]


def strategy_settings(name):
    """``(method, virtual_cores, core_grad_mode)`` of :class:`privasr.private_step.PerCoreClipping` for a strategy."""
    if name in ("none", "global", "pcc", "apcc"):
        return name, 1, "loop"
    if name.startswith("pcc-v"):
        k = name[len("pcc-v"):]
        if not (k.isdigit() and int(k) >= 1):
            raise ValueError(f"unknown strategy {name!r}: pcc-vK needs an integer K >= 1 (virtual cores per process)")
        return "pcc", int(k), "loop"
    if name in ("pec-vmap", "pec-loop"):  # one core per example
        return "pec", 1, name[len("pec-"):]
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(DEFAULT_STRATEGIES)} or pcc-vK")


class _FromFeatures(torch.nn.Module):
    """``model.forward_features`` as ``forward``, so DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats, feat_lens):
        return self.model.forward_features(feats, feat_lens)


def _step_fn(args, model, batch, strategy):
    """Returns a zero-argument function doing one full training step."""
    from privasr.private_step import PerCoreClipping

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    feats, feat_lens = model.features(batch[0], batch[1])
    tensors = (feats, feat_lens, batch[2], batch[3])
    device_type = feats.device.type
    precision = getattr(args, "precision", "fp32")

    def autocast():  # what SpeechBrain's --precision bf16 does around the training step
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def loss_fn(f, fl, y, yl):
        with autocast():
            log_probs, out_lens = model.forward_features(f, fl)
        return model.loss(log_probs.float(), out_lens, y, yl, reduction="mean")

    if strategy == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(_FromFeatures(model))

        def ddp_step():  # the same work as the others: features are computed once, outside the step
            with autocast():
                log_probs, out_lens = ddp(feats, feat_lens)
            model.loss(log_probs.float(), out_lens, batch[2], batch[3]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return ddp_step

    method, virtual_cores, mode = strategy_settings(strategy)
    bound = 1.0 if method in ("pcc", "pec", "global") else None
    clip = PerCoreClipping(model, method, bound, virtual_cores, core_grad_mode=mode)  # the training step's own object

    return functools.partial(clipping_step, clip, optimizer, loss_fn, tensors)


def clipping_step(clip, optimizer, loss_fn, tensors):
    """One training step with a :class:`privasr.private_step.PerCoreClipping` object ``clip``.

    ``clip.backward(loss_fn, *tensors)`` (the row's clipping of the shard's gradient), then
    ``clip.reduce()`` (the all-reduce across ranks); the optimizer steps unless the reduce says the
    step is skipped (no core's gradient finite, ``stats.skipped``), and the gradients are always
    cleared, as the training loop does. Shared by :func:`_step_fn` and privasr-bench-dp's non-private BEST-RQ row.
    """
    clip.backward(loss_fn, *tensors)
    if not clip.reduce().skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _worker(rank, world_size, port, args, strategy, out_path):
    """One rank of a row: its own process group, the row's steps timed, rank 0 writes the result.

    The group must really end with the row (:func:`privasr.distributed.ordered_shutdown`), or its gloo
    threads and the rendezvous store's server thread still run while the interpreter finalizes and
    ``exit()`` runs the C++ static destructors (the likely cause of a rare SIGABRT after a row's figures
    were written; pytorch/pytorch#179291 describes that abort for a group left alive at exit). That needs
    ``torch.distributed.nn`` imported before the group exists (privasr.distributed, imported above, does): its
    functions bind ``group=group.WORLD`` as default arguments when first imported, and torch.optim
    imports it lazily (through ``torch._dynamo``) at the first optimizer, after ``init_process_group``;
    those defaults would then hold the group for the life of the process, past destroy_process_group.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    with ordered_shutdown():  # a store barrier, then each rank's group destroyed in turn (privasr.distributed)
        model = build_model(args, device)
        step = _step_fn(args, model, make_batch(args, rank, device), strategy)
        rss_ready = _current_rss_bytes()  # model and batch in memory, no step taken yet
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        times = []
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        # CPU: the steps' working memory = peak RSS during the timed steps above the RSS with model and batch loaded.
        peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes() - rss_ready
        result = {"median_s": statistics.median(times), "peak_bytes": peak}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"median_s": max(r["median_s"] for r in gathered),
                           "peak_bytes": max(r["peak_bytes"] for r in gathered)}, f)


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so that set-up peaks don't hide the steps'."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerDied(Exception):
    """A row's worker process ended with a signal, an exit status or an exception: the row has no figures."""


def spawn_row(worker, args, row) -> dict:
    """``worker(rank, nproc, port, args, row, out_path)`` in ``args.nproc`` fresh processes; the JSON rank 0 wrote.

    A process that dies is :class:`WorkerDied`, one line naming the row, the process and the signal,
    exit status or exception (torch's exception carries the child's traceback as text; only its last
    line, the exception itself, is kept).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        try:
            mp.spawn(worker, args=(args.nproc, _free_port(), args, row, out), nprocs=args.nproc, join=True)
        except mp.ProcessExitedException as err:
            if os.environ.get("PRIVASR_DEBUG"):
                raise
            how = (f"was killed by {err.signal_name} (its own message, if it wrote one, is above)"
                   if err.signal_name else f"exited with status {err.exit_code}")
            raise WorkerDied(f"row {row}: worker process {err.error_index} of {args.nproc} {how}") from None
        except mp.ProcessRaisedException as err:
            if os.environ.get("PRIVASR_DEBUG"):
                raise
            lines = [line.strip() for line in err.msg.splitlines() if line.strip()]
            raise WorkerDied(f"row {row}: worker process {err.error_index} of {args.nproc} raised "
                             f"{lines[-1] if lines else 'an exception'}") from None
        with open(out) as f:
            return json.load(f)


def measure(args, strategy):
    """Median step time and peak step memory of one strategy, in a fresh group of processes."""
    return spawn_row(_worker, args, strategy)


def markdown_table(results, reference="none"):
    ref = results[reference]
    header = ["strategy", "median step (s)", "time / none", "peak step memory (MiB)", "memory / none"]
    rows = [[name, f"{r['median_s']:.3f}", f"{r['median_s'] / ref['median_s']:.2f}x", f"{r['peak_bytes'] / 2**20:.0f}",
             f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x"] for name, r in results.items()]
    return "\n".join(table_lines(header, rows))


def model_arguments(p: CliParser) -> None:
    """The options both benchmarks share: processes, the random batch, the Conformer, timing, output."""
    p.add_argument("--nproc", type=positive_int, default=2, help="DDP processes (cores)")
    p.add_argument("--seconds", type=positive_float, default=3.0, help="longest utterance, seconds")
    p.add_argument("--vocab", type=positive_int, default=32, help="output classes incl. the CTC blank (>= 2)")
    p.add_argument("--d-model", type=positive_int, default=144)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (must divide --d-model)")
    p.add_argument("--warmup", type=nonnegative_int, default=1)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is there")
    p.add_argument("--json", type=output_file, help="also write the results here")


def check_model_arguments(p: CliParser, args) -> None:
    """Refuse, before any process starts, settings the model or the output cannot take (one line)."""
    if args.vocab < 2:
        p.error(f"--vocab must be >= 2 (the CTC blank and at least one token), got {args.vocab}")
    if args.d_model % args.heads:
        p.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda and args.nproc > torch.cuda.device_count():
        p.error(f"--nproc {args.nproc} but {torch.cuda.device_count()} GPU(s): one process per GPU (or --cpu)")
    infeasible = ctc_infeasible_utterances(args)
    if infeasible:
        p.error(f"{infeasible} of the {args.nproc * args.batch} random utterances have more tokens than CTC output "
                f"frames (their loss would be silently zero): raise --seconds or lower --tokens")


def ctc_infeasible_utterances(args) -> int:
    """How many of the benchmark's utterances (every rank's batch) CTC cannot align.

    The output frames depend only on the audio lengths, so one forward pass of rank 0's batch
    gives them; each rank's transcripts are then checked with :func:`privasr.asr.brain.ctc_infeasible`.
    """
    from privasr.asr.brain import ctc_infeasible

    model = build_model(args, torch.device("cpu"))
    with torch.no_grad():
        wavs, wav_lens, _, _ = make_batch(args, 0, "cpu")
        log_probs, out_lens = model.forward_features(*model.features(wavs, wav_lens))
    frames = torch.round(out_lens * log_probs.shape[1])
    count = 0
    for rank in range(args.nproc):
        _, _, tokens, token_lens = make_batch(args, rank, "cpu")
        count += int(ctc_infeasible(frames, tokens, torch.round(token_lens * tokens.shape[1])).sum())
    return count


def parse_args(argv=None):
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES,
                   help=f"default: {' '.join(DEFAULT_STRATEGIES)} (pcc-vK: K virtual cores per process)")
    p.add_argument("--batch", type=positive_int, default=8, help="utterances per process")
    p.add_argument("--tokens", type=positive_int, default=30, help="transcript length in tokens")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps (>= 1)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="autocast dtype of forward/backward (bf16: as --precision bf16 in the recipes)")
    model_arguments(p)
    args = p.parse_args(argv)
    for s in args.strategies:
        try:
            _, cores, _ = strategy_settings(s) if s != "ddp" else (None, 1, None)
        except ValueError as e:
            p.error(str(e))
        if cores > args.batch:
            p.error(f"strategy {s}: {cores} virtual cores need at least as many utterances per process "
                    f"(--batch {args.batch})")
    check_model_arguments(p, args)
    args.strategies = list(dict.fromkeys(args.strategies))  # a strategy named twice is measured once
    if "none" not in args.strategies:
        args.strategies = ["none"] + args.strategies
    return args


def run_rows(args, rows, measure_row, details: str = "", prog: str = PROG) -> int:
    """Measure every row in turn, print the settings and the markdown table, write ``--json``; the exit status.

    A row whose worker died (:class:`WorkerDied`) ends the run there: one line ``<prog>: error: ...``
    on stderr, no table, status 1.
    """
    results = {}
    for row in rows:
        print(f"measuring {row} ...", file=sys.stderr, flush=True)
        try:
            results[row] = measure_row(args, row)
        except WorkerDied as err:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            return 1
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu (gloo)"
    print(f"\n{args.nproc} processes on {device}; per process: {args.batch} utterances of <= {args.seconds}s, "
          f"Conformer d={args.d_model} x{args.layers}; {details}median of {args.steps} steps\n")
    print(markdown_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


def _main(argv=None):
    args = parse_args(argv)
    return run_rows(args, args.strategies, measure, details=f"{args.precision}; ")


def main(argv=None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2; a worker died: one line, 1)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
