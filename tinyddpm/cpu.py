"""How tinyddpm uses a CPU: one intra-op thread per *free* core, and big tensors kept in the heap.

Threads. torch runs each op on an OpenMP team of one thread per core, and every op ends at a barrier. When another
busy process shares the cores, the team thread that shares a core with it runs only part of each time slice; every op
waits for it at the barrier while the other team threads spin (libgomp's default wait policy), taking CPU from the
other process as well. On 2 cores one single-threaded neighbour cut `tiny` training to 10-30 % of its idle speed
(issue 18).
With one thread per free core no op waits for a descheduled thread, and the neighbour keeps its core.

So `configure()` (called by the scripts at start-up, through `run_cli(main, setup=configure)`) measures how much CPU
the *other* processes use (the machine's busy time in /proc/stat minus this process's CPU time, over an interval)
and sets torch.set_num_threads to the cores they leave free, at least 1, at most torch's default. It measures once
at start-up (PROBE_S) and then every ADAPT_INTERVAL_S while it works: in training by a hook after every optimizer
step, in sampling and Inception feature passes by `follow_free_cores()` before each network call (the thread count
is a per-thread OpenMP setting, so it must be changed from the thread that runs the ops). Without the re-measure a
neighbour busy during the 0.2 s probe left a whole 9-minute report on one thread. An explicit
count turns the policy off: TINYDDPM_THREADS=N, or OMP_NUM_THREADS as torch reads it.

The OpenMP wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT) is left alone: libgomp reads it once, when `import torch`
loads it, which in a script or notebook may happen before any tinyddpm code runs; and with one thread per free core
nobody waits at a barrier for a descheduled thread, while on an idle machine spinning is what makes small ops fast.

Allocations. glibc serves every block above its mmap threshold (adaptive, at most 32 MiB) with fresh pages from
mmap, so each such tensor costs a page fault per 4 KiB and a munmap. At the report's sampling batch of 256, each
32-channel 32×32 activation is 33.5 MB: sampling spent over a third of its CPU time in the kernel (system time),
and training at large batches likewise. A fixed threshold of HEAP_THRESHOLD_BYTES keeps them in the heap,
where freed blocks are reused. Linux only (/proc/stat, glibc); elsewhere `configure` changes nothing.
"""
import ctypes
import ctypes.util
import os
import time

from .errors import UserError

THREADS_ENV = "TINYDDPM_THREADS"  # an explicit intra-op thread count (turns the policy off)
PROBE_S = 0.2  # start-up measurement of the other processes' CPU use (20 clock ticks per core at USER_HZ = 100)
ADAPT_INTERVAL_S = 2.0  # how often training re-measures (a neighbour that starts or stops is followed this fast)
# A core counts as taken when the other processes use at least this fraction of one. Low on purpose: a neighbour
# fighting our spinning team gets only ~2/3 of a core, and an occasional 10 % (a shell, a daemon) must not count.
BUSY_CORE_FRACTION = 0.3
# glibc M_MMAP_THRESHOLD: blocks below 512 MiB come from the heap and are reused (mallopt takes a C int: < 2 GiB).
HEAP_THRESHOLD_BYTES = 1 << 29
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)
PROC_STAT = "/proc/stat"
# Fields of /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal (guest time is inside user).
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)

_policy = None  # the ThreadPolicy that `configure` installed, if any (one per process)


def keep_big_allocations_in_heap():
    """Fixed glibc mmap (and trim) thresholds so big tensors reuse heap memory; False where this is not glibc."""
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "confstr"):
        return False
    try:
        libc = ctypes.CDLL(name)
        if "glibc" not in os.confstr("CS_GNU_LIBC_VERSION").lower() or not hasattr(libc, "mallopt"):
            return False
        # Trim only above twice the threshold, or the top of the heap would be handed back and faulted in again.
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_THRESHOLD_BYTES))
    except (OSError, ValueError, AttributeError):
        return False


def busy_seconds(proc_stat_text, ticks_per_s):
    """CPU-seconds all cores have spent busy since boot, from the text of /proc/stat."""
    fields = proc_stat_text.split("\n", 1)[0].split()
    assert fields[0] == "cpu", "the first line of /proc/stat sums all cores"
    values = [int(v) for v in fields[1:]]
    return sum(values[i] for i in BUSY_FIELDS if i < len(values)) / ticks_per_s


def threads_for(others_cores, cores, max_threads):
    """Intra-op threads for the cores that the other processes (using `others_cores` cores' worth) leave free."""
    taken = int(others_cores + 1 - BUSY_CORE_FRACTION)  # whole cores, each counted from BUSY_CORE_FRACTION on
    return max(1, min(max_threads, cores - taken))


class ThreadPolicy:
    """Follows the free cores: `update()` re-measures (at most every `interval` s) and sets torch's thread count."""

    def __init__(self, max_threads, cores=None, interval=ADAPT_INTERVAL_S, read_stat=None, clock=time.monotonic,
                 own_cpu=None):
        self.max_threads, self.cores, self.interval = max_threads, cores or os.cpu_count() or 1, interval
        self.read_stat, self.clock, self.own_cpu = read_stat or _read_proc_stat, clock, own_cpu or _own_cpu_seconds
        self.last = self.sample()
        self.others_cores = 0.0
        self.hook = None  # the optimizer-step hook `configure` registers

    def sample(self):
        """(wall s, machine busy CPU-s, this process's CPU-s)."""
        return self.clock(), busy_seconds(self.read_stat(), os.sysconf("SC_CLK_TCK")), self.own_cpu()

    def update(self, force=False):
        """Re-measure if an interval has passed (or `force`) and set the thread count; returns the count."""
        import torch

        if force or self.clock() - self.last[0] >= self.interval:
            now = self.sample()
            wall = now[0] - self.last[0]
            if wall > 0:
                # The others' busy time: the whole machine's minus ours (our spinning threads are ours).
                self.others_cores = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall
                self.last = now
            threads = threads_for(self.others_cores, self.cores, self.max_threads)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()

    def probe(self, seconds=PROBE_S):
        """One measurement over `seconds` of sleep (at start-up, before any work of ours)."""
        time.sleep(seconds)
        return self.update(force=True)


def follow_free_cores():
    """Re-measure (rate-limited to the policy's interval) and set the thread count, where `configure` installed a
    policy; for loops without an optimizer step (sampling, feature passes). Returns torch's thread count then."""
    import torch

    return _policy.update() if _policy is not None else torch.get_num_threads()


def _own_cpu_seconds():
    t = os.times()  # all of this process's threads
    return t.user + t.system


def _read_proc_stat():
    with open(PROC_STAT) as f:
        return f.read()


def explicit_threads(env):
    """The thread count the user set in TINYDDPM_THREADS (None if unset); a bad value is a user error."""
    value = env.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{THREADS_ENV}={value!r} is not a thread count; set a whole number ≥ 1, or unset it to let "
                        "tinyddpm follow the free cores")
    return int(value)


def configure(env=None):
    """Start-up CPU policy of the scripts: heap allocations, then threads. Returns the ThreadPolicy or None."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    global _policy
    env = os.environ if env is None else env
    keep_big_allocations_in_heap()
    if _policy is not None and _policy.hook is not None:  # configured twice in one process: drop the old hook
        _policy.hook.remove()
    _policy = None
    n = explicit_threads(env)
    if n is not None:
        torch.set_num_threads(n)
        return None
    if env.get("OMP_NUM_THREADS") or not os.path.exists(PROC_STAT):
        return None
    policy = ThreadPolicy(torch.get_num_threads())
    policy.probe()
    # Training re-measures after optimizer steps (the loop's own thread; rate-limited to ADAPT_INTERVAL_S).
    policy.hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: policy.update())
    _policy = policy
    return policy
