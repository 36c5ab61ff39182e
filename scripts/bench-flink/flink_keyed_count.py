"""Apache Flink side of `ferry bench throughput`: the same keyed tumbling count.

Run by scripts/bench-flink.sh inside its own venv (apache-flink from PyPI).
The job is expressed with the Table API / SQL, so no Python runs per record:

  source   NumberSequenceSource (env.fromSequence(0, N-1), Java, FLIP-27):
           one BIGINT `seq` per event, bounded, parallelism 1
  table    k  = seq % <keys>           (10,000 distinct integer keys)
           ts = TO_TIMESTAMP_LTZ(seq, 3)   (event time advances 1 ms per event)
           WATERMARK FOR ts AS ts - INTERVAL '0.1' SECOND   (100 ms out-of-orderness)
  query    INSERT INTO blackhole
           SELECT k, TUMBLE_START(ts, INTERVAL '1' MINUTE), COUNT(*)
           FROM events GROUP BY k, TUMBLE(ts, INTERVAL '1' MINUTE)

Flink runs in local mode: a MiniCluster inside the JVM that PyFlink starts (the
py4j gateway process), parallelism 1, HashMap state backend (Flink's default),
streaming runtime mode. Checkpoints: off, or every <interval> to local
filesystem storage in a temp dir.

CPU time is the JVM process's utime+stime from /proc/<jvm pid>/stat (all of
its threads: task threads, GC, JIT, timers), read just before and after each
job; the JVM's pid comes from the JVM itself (ProcessHandle.current().pid()).
Python's own CPU is not counted (it only waits on py4j during the job).

Progress goes to stderr; the Markdown table (or --json) to stdout.
"""

import argparse
import glob
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(
        prog="bench-flink.sh",
        description="Keyed tumbling count on Apache Flink (local MiniCluster, parallelism 1), "
        "with and without checkpoints; reports events per CPU-second of the JVM.")
    p.add_argument("--events", type=int, default=30_000_000, help="events per run (default 30M)")
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys (default 10000)")
    p.add_argument("--checkpoint-interval", default="1s",
                   help="checkpoint interval of the 'with checkpoints' run (Flink duration, default 1s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each variant, interleaved; the median is reported (default 3)")
    p.add_argument("--warmup-events", type=int, default=2_000_000,
                   help="events of one unreported warm-up run per variant, for the JIT "
                        "(default 2M; 0 = none)")
    p.add_argument("--verify-events", type=int, default=120_000,
                   help="events of a correctness run that collects the window counts and "
                        "checks they sum to the input (default 120000; 0 = skip)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds after which one run is cancelled and the benchmark fails")
    p.add_argument("--window-syntax", choices=["group", "tvf"], default="group",
                   help="group: GROUP BY TUMBLE(...) (GroupWindowAggregate, one phase, the "
                        "default); tvf: TABLE(TUMBLE(...)) window TVF (Flink's newer slicing "
                        "window aggregate, which pre-aggregates per key in a buffer)")
    p.add_argument("--local-time-zone", default="UTC",
                   help="table.local-time-zone (default UTC; see README note on Etc/UTC)")
    p.add_argument("--thread-cpu", action="store_true",
                   help="also print the JVM threads that used the most CPU in each run")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p.parse_args()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(path):
    """utime+stime in seconds from a /proc/.../stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the comm field: state=0 ... utime=11, stime=12
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid):
    out = {}
    for d in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(os.path.join(d, "comm")) as f:
                name = f.read().strip()
            out[(os.path.basename(d), name)] = proc_cpu(os.path.join(d, "stat"))
        except OSError:
            pass
    return out


class ThreadSampler:
    """CPU per JVM thread over a job, for --thread-cpu: threads that start and
    end within the job (the task threads) are caught by sampling /proc every
    0.2 s in a Python thread; their last sample is used (< 0.2 s may be missed
    per thread). Diagnostic only: the reported CPU comes from the process."""

    def __init__(self, pid):
        import threading
        self.pid = pid
        self.start = thread_cpu(pid)
        self.last = dict(self.start)
        self.done = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        deadline = time.monotonic() + 24 * 3600
        while not self.done.wait(0.2) and time.monotonic() < deadline:
            self.last.update(thread_cpu(self.pid))

    def stop(self):
        self.done.set()
        self.t.join(5)
        self.last.update(thread_cpu(self.pid))

    def top(self, n):
        per_name = {}
        for k, v in self.last.items():
            d = v - self.start.get(k, 0.0)
            if d > 0:
                name = re.sub(r"\d+$", "#", k[1])  # GC Thread#0, #1 ... -> GC Thread#
                per_name[name] = per_name.get(name, 0.0) + d
        return sorted(per_name.items(), key=lambda kv: -kv[1])[:n]


def flink_duration_seconds(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?\s*", s)
    if not m:
        raise SystemExit(f"bad --checkpoint-interval {s!r}: use e.g. 500ms, 1s, 1min")
    v = float(m.group(1))
    return v * {"ms": 1e-3, "s": 1, None: 1e-3, "min": 60, "m": 60, "h": 3600}[m.group(2)]


def main():
    a = parse_args()
    if a.events <= 0 or a.keys <= 0 or a.repeat <= 0:
        raise SystemExit("--events, --keys and --repeat must be positive")
    flink_duration_seconds(a.checkpoint_interval)

    work = tempfile.mkdtemp(prefix="ferry-bench-flink-")
    log_dir = os.path.join(work, "log")
    os.makedirs(log_dir)
    # The gateway launcher reads FLINK_LOG_DIR: keep Flink's log out of the venv;
    # completed checkpoints are counted from it.
    os.environ["FLINK_LOG_DIR"] = log_dir
    try:
        return run(a, work, log_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(a, work, log_dir):
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.datastream.data_stream import DataStream
    from pyflink.java_gateway import get_gateway
    from pyflink.table import EnvironmentSettings, Schema, StreamTableEnvironment
    import pyflink.version

    t_boot = time.monotonic()
    gateway = get_gateway()  # starts the JVM
    jvm = gateway.jvm
    pid = int(jvm.java.lang.ProcessHandle.current().pid())
    flink_version = str(jvm.org.apache.flink.runtime.util.EnvironmentInformation.getVersion())
    java_version = str(jvm.java.lang.System.getProperty("java.vm.version"))
    gcs = [str(b.getName()) for b in jvm.java.lang.management.ManagementFactory
           .getGarbageCollectorMXBeans()]
    max_heap = int(jvm.java.lang.Runtime.getRuntime().maxMemory())
    log(f"flink {flink_version} (pyflink {pyflink.version.__version__}), java {java_version}, "
        f"jvm pid {pid}, gc {'/'.join(gcs)}, max heap {max_heap / 2**30:.1f} GiB, "
        f"gateway up in {time.monotonic() - t_boot:.1f} s")

    def make_tenv(interval, ckpt_dir):
        conf = Configuration()
        conf.set_string("execution.runtime-mode", "STREAMING")
        conf.set_string("parallelism.default", "1")
        conf.set_string("state.backend.type", "hashmap")  # Flink's default, stated
        if interval:
            conf.set_string("execution.checkpointing.interval", interval)
            conf.set_string("execution.checkpointing.storage", "filesystem")
            conf.set_string("execution.checkpointing.dir", "file://" + ckpt_dir)
        env = StreamExecutionEnvironment.get_execution_environment(conf)
        env.set_parallelism(1)
        settings = EnvironmentSettings.new_instance().in_streaming_mode().build()
        t_env = StreamTableEnvironment.create(env, environment_settings=settings)
        t_env.get_config().set("table.local-time-zone", a.local_time_zone)
        return env, t_env

    def pipeline(env, t_env, events, sink_ddl):
        # Java NumberSequenceSource; PyFlink has no wrapper for fromSequence.
        j_ds = env._j_stream_execution_environment.fromSequence(0, events - 1)
        schema = (Schema.new_builder()
                  .column("f0", "BIGINT NOT NULL")
                  .column_by_expression("k", f"f0 % {a.keys}")
                  .column_by_expression("ts", "TO_TIMESTAMP_LTZ(f0, 3)")
                  .watermark("ts", "ts - INTERVAL '0.1' SECOND")
                  .build())
        t_env.create_temporary_view("events", t_env.from_data_stream(DataStream(j_ds), schema))
        t_env.execute_sql("DROP TEMPORARY TABLE IF EXISTS sink")
        t_env.execute_sql(sink_ddl)
        if a.window_syntax == "group":
            return ("INSERT INTO sink SELECT k, TUMBLE_START(ts, INTERVAL '1' MINUTE), COUNT(*) "
                    "FROM events GROUP BY k, TUMBLE(ts, INTERVAL '1' MINUTE)")
        return ("INSERT INTO sink SELECT k, window_start, COUNT(*) FROM TABLE("
                "TUMBLE(TABLE events, DESCRIPTOR(ts), INTERVAL '1' MINUTE)) "
                "GROUP BY k, window_start, window_end")

    sink_cols = "(k BIGINT, w TIMESTAMP_LTZ(3), c BIGINT)" if a.window_syntax == "group" \
        else "(k BIGINT, w TIMESTAMP(3), c BIGINT)"
    blackhole = f"CREATE TEMPORARY TABLE sink {sink_cols} WITH ('connector' = 'blackhole')"

    def completed_checkpoints(job_id):
        n = 0
        for path in glob.glob(os.path.join(log_dir, "*.log")):
            with open(path, errors="replace") as f:
                for line in f:
                    if "Completed checkpoint" in line and job_id in line:
                        n += 1
        return n

    def run_once(events, interval, label, record=True):
        ckpt_dir = tempfile.mkdtemp(prefix="chk-", dir=work)
        env, t_env = make_tenv(interval, ckpt_dir)
        insert = pipeline(env, t_env, events, blackhole)
        sampler = ThreadSampler(pid) if a.thread_cpu else None
        c0, t0 = proc_cpu(f"/proc/{pid}/stat"), time.monotonic()
        result = t_env.execute_sql(insert)  # plans, starts a MiniCluster, submits
        c1, t1 = proc_cpu(f"/proc/{pid}/stat"), time.monotonic()
        try:
            result.wait(int(a.timeout * 1000))
        except Exception:
            try:
                result.get_job_client().cancel().result()
            except Exception:
                pass
            raise SystemExit(f"{label}: job did not finish within {a.timeout:.0f} s")
        finally:
            if sampler is not None:
                sampler.stop()
        c2, t2 = proc_cpu(f"/proc/{pid}/stat"), time.monotonic()
        client = result.get_job_client()
        job_id = str(client.get_job_id())
        net_ms = client.get_job_execution_result().result().get_net_runtime()
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        wall, cpu = t2 - t1, c2 - c1
        r = {
            "wall_s": wall,
            "cpu_s": cpu,
            "events_per_s": events / wall,
            "events_per_cpu_s": events / cpu if cpu > 0 else float("inf"),
            "checkpoints": completed_checkpoints(job_id) if interval else 0,
            "net_runtime_s": net_ms / 1000.0,
            "submit_wall_s": t1 - t0,
            "submit_cpu_s": c1 - c0,
            "events_per_cpu_s_incl_submit": events / (c2 - c0),
        }
        log(f"  {label:<34} {r['events_per_cpu_s'] / 1e6:7.2f} M ev/s per core  "
            f"({wall:.2f} s wall, {cpu:.2f} s cpu, {r['checkpoints']} checkpoints; "
            f"planning+minicluster start {t1 - t0:.2f} s wall, {c1 - c0:.2f} s cpu)")
        if sampler is not None:
            log("      threads: " + ", ".join(f"{n} {s:.2f}s" for n, s in sampler.top(8)))
        return r

    def verify():
        n = a.verify_events
        env, t_env = make_tenv(None, None)
        insert = pipeline(env, t_env, n, blackhole)
        select = insert.split("INSERT INTO sink ", 1)[1]
        total, rows = 0, 0
        with t_env.execute_sql(select).collect() as it:
            for row in it:
                total += row[2]
                rows += 1
        windows = (n - 1) // 60_000 + 1
        expect_rows = sum(min(a.keys, 60_000, n - w * 60_000) for w in range(windows))
        ok = total == n and rows == expect_rows
        log(f"verify: {n} events -> {rows} window results summing to {total} "
            f"(expected {expect_rows} results summing to {n}): {'ok' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit("verification failed: the Flink job does not count every event once")

    log(f"keyed tumbling count on Flink: {a.events} events, {a.keys} keys, parallelism 1, "
        f"window syntax {a.window_syntax}; median of {a.repeat}")
    if a.verify_events > 0:
        verify()
    variants = [(None, "without checkpoints"),
                (a.checkpoint_interval, f"checkpoints every {a.checkpoint_interval}")]
    if a.warmup_events > 0:
        for interval, name in variants:
            run_once(a.warmup_events, interval, f"warm-up {name}")
    runs = [[], []]
    for i in range(a.repeat):
        for v, (interval, name) in enumerate(variants):
            runs[v].append(run_once(a.events, interval, f"run {i + 1} {name}"))

    def median(rs):
        rs = sorted(rs, key=lambda r: r["events_per_cpu_s"])
        return rs[len(rs) // 2]

    off, on = median(runs[0]), median(runs[1])
    overhead = (1.0 - on["events_per_cpu_s"] / off["events_per_cpu_s"]) * 100.0
    settings = {
        "execution.runtime-mode": "STREAMING",
        "parallelism.default": 1,
        "state.backend.type": "hashmap (default)",
        "execution.checkpointing.interval": f"{a.checkpoint_interval} (with-checkpoints variant)",
        "execution.checkpointing.storage": "filesystem, local temp dir (with-checkpoints variant)",
        "table.local-time-zone": a.local_time_zone,
        "window syntax": a.window_syntax,
        "everything else": "Flink defaults",
    }
    if a.json:
        print(json.dumps({
            "engine": "flink",
            "flink_version": flink_version,
            "java_version": java_version,
            "gc": gcs,
            "max_heap_bytes": max_heap,
            "python": platform.python_version(),
            "events": a.events, "keys": a.keys,
            "checkpoint_interval": a.checkpoint_interval,
            "repeat": a.repeat, "warmup_events": a.warmup_events,
            "settings": settings,
            "without_checkpoints": off, "with_checkpoints": on,
            "checkpoint_overhead_percent": overhead,
            "runs": {"without_checkpoints": runs[0], "with_checkpoints": runs[1]},
        }, indent=None))
    else:
        print(f"Apache Flink {flink_version} (PyFlink local MiniCluster, Table API/SQL, "
              f"window syntax `{a.window_syntax}`, Java {java_version}, {'/'.join(gcs)}), "
              f"{a.events} events, {a.keys} keys, median of {a.repeat}:")
        print()
        print("| variant | M events/s per core | wall s | cpu s | checkpoints | M events/s (wall) |")
        print("|---|---|---|---|---|---|")
        for name, r in [("without checkpoints", off),
                        (f"checkpoints every {a.checkpoint_interval}", on)]:
            print(f"| {name} | {r['events_per_cpu_s'] / 1e6:.2f} | {r['wall_s']:.2f} | "
                  f"{r['cpu_s']:.2f} | {r['checkpoints']} | {r['events_per_s'] / 1e6:.2f} |")
        print(f"checkpoint overhead: {overhead:.1f} %")
        print()
        print("CPU = utime+stime of the whole Flink JVM (all threads, incl. GC/JIT) from job "
              "submission to job end; excludes JVM start, SQL planning and MiniCluster start "
              f"(median {off['submit_cpu_s']:.2f} s cpu, {off['submit_wall_s']:.2f} s wall per "
              "job). Settings other than Flink defaults: parallelism 1, "
              f"table.local-time-zone={a.local_time_zone}, checkpoint interval/storage.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
