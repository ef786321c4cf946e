"""Test processes, set up before jax is imported: eight simulated CPU devices for the sharding
tests, a persistent XLA compilation cache, and (default run) cheaper LLVM code generation.

Why the cache: the tests are compile-bound (test_train.py's default tests: 216 s cold, 54 s with
every program already compiled) and many tests compile the same tiny-model programs, so a test
reuses what an earlier test, another xdist worker, a subprocess, or the earlier default run (CI
runs the slow tests after it) compiled. Entries are keyed by the program, the jax/XLA versions
and the flags, so a changed program never reads a stale one. It lives in .pytest_cache/ (git
ignores it); JAXLLM_TEST_COMPILE_CACHE=0 turns it off, =DIR moves it. Delete the folder to time a
cold run (a fresh clone's)."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("JAXLLM_TEST_FAST_COMPILE") == "1":
    # launch/test.sh's default run: most of its time is LLVM compiling small programs, which
    # these flags cut (test_train.py's default tests: 216 s -> 159 s). Semantics are XLA's either
    # way; the slow (execution-bound) run and users keep XLA's default optimisation.
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_cache = os.environ.get("JAXLLM_TEST_COMPILE_CACHE",
                        str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compile"))
if _cache != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # tiny programs too
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # No jax_compilation_cache_max_size: with it, every write globs and stats the whole folder
    # (jax's LRU eviction) and a default run took 32 min instead of ~20. A run adds ~50 MB.


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _collect_in_the_main_thread():
    """After each test, collect its garbage here, in the test's thread. A grain iterator a test
    dropped unclosed is otherwise closed by whichever thread next triggers the collector, and
    when that is a prefetch thread inside ThreadPoolExecutor.submit the process can hang
    (jaxllm/data/pipeline.py closing_batches; seen on Python 3.13)."""
    yield
    gc.collect()
