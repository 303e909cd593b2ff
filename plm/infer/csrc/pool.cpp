// A small thread pool for the decode step. Why not at::parallel_for (OpenMP): a decode step
// has about eight parallel regions per layer, each ending in a barrier that waits for every
// team thread, so a worker that the OS has descheduled (another process on the core) stalls
// the step for a scheduler tick per region: 190 ms instead of 0.6 ms per token on a loaded
// 2-core machine. Here the calling thread claims chunks from an atomic counter like the
// workers do and waits only for chunks already claimed: a late worker costs nothing.
// Threads: torch.get_num_threads() (the caller plus that many minus one workers).
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "plm_native.h"

namespace plm {
namespace {

struct Task {
  const ParallelFn* fn;
  int64_t total, grain, nchunks;
  std::atomic<int64_t> next{0}, done{0};
};

class Pool {
 public:
  ~Pool() { resize(1); }

  void run(int64_t total, int64_t grain, const ParallelFn& fn) {
    const int n = std::max(1, at::get_num_threads());
    const int64_t nchunks = ceil_div(total, std::max<int64_t>(grain, 1));
    std::unique_lock<std::mutex> guard(run_mu_, std::try_to_lock);
    if (n == 1 || nchunks <= 1 || !guard.owns_lock()) {  // serial, or another caller holds the pool
      fn(0, total, 0);
      return;
    }
    resize(n);
    Task t;
    t.fn = &fn;
    t.total = total;
    t.grain = std::max<int64_t>(grain, 1);
    t.nchunks = nchunks;
    task_.store(&t, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_acq_rel);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (sleepers_) cv_.notify_all();
    }
    work(&t, 0);
    while (t.done.load(std::memory_order_acquire) < t.nchunks) _mm_pause();
    task_.store(nullptr, std::memory_order_release);
    while (active_.load(std::memory_order_acquire) != 0) _mm_pause();  // t may then go out of scope
  }

 private:
  static void work(Task* t, int tid) {
    for (;;) {
      const int64_t c = t->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= t->nchunks) return;
      const int64_t b = c * t->grain;
      (*t->fn)(b, std::min(t->total, b + t->grain), tid);
      t->done.fetch_add(1, std::memory_order_release);
    }
  }

  void worker(int tid) {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin about 100 us (decode steps issue tasks back to back), then sleep
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; i++) {
        if (stop_.load(std::memory_order_relaxed)) return;
        _mm_pause();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(100)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_++;
          cv_.wait(lk, [&] { return gen_.load() != seen || stop_.load(); });
          sleepers_--;
          t0 = std::chrono::steady_clock::now();
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      active_.fetch_add(1, std::memory_order_acq_rel);
      if (Task* t = task_.load(std::memory_order_acquire)) work(t, tid);
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void resize(int n) {  // n threads in all, the caller included
    if ((int)threads_.size() == n - 1) return;
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& th : threads_) th.join();
    threads_.clear();
    stop_ = false;
    for (int i = 1; i < n; i++) threads_.emplace_back([this, i] { worker(i); });
  }

  std::vector<std::thread> threads_;
  std::atomic<Task*> task_{nullptr};
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  int sleepers_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers must not be joined during exit
  return *p;
}

}  // namespace

void parallel_run(int64_t total, int64_t grain, const ParallelFn& fn) {
  if (total <= 0) return;
  pool().run(total, grain, fn);
}

}  // namespace plm
