// A compiled closed-loop Rank client for bench/compiled_client.py: N caller threads, each
// with its own channel, send prebuilt RankRequests back to back; after a warm-up, every
// call's latency is kept. Prints one line of JSON: calls, errors, p50/p90/p99/max in ms,
// calls per second and this process's CPU seconds (user + system, all threads).
//
//   rank_client TARGET REQUESTS_FILE CALLERS WARMUP_SECONDS SECONDS
//
// REQUESTS_FILE holds serialized avrec.v1.RankRequest messages, each after its length as a
// little-endian uint32.
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "avrec/v1/ranking.grpc.pb.h"

using Clock = std::chrono::steady_clock;

static std::vector<avrec::v1::RankRequest> read_requests(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<avrec::v1::RankRequest> requests;
  uint32_t size = 0;
  while (in.read(reinterpret_cast<char*>(&size), sizeof size)) {
    std::string bytes(size, '\0');
    if (!in.read(bytes.data(), size)) break;
    requests.emplace_back();
    if (!requests.back().ParseFromString(bytes)) requests.pop_back();
  }
  return requests;
}

static double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

static double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0.0;
  double at = q * (sorted.size() - 1);
  size_t low = static_cast<size_t>(at);
  size_t high = std::min(low + 1, sorted.size() - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (at - low);
}

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s TARGET REQUESTS_FILE CALLERS WARMUP_SECONDS SECONDS\n",
                 argv[0]);
    return 2;
  }
  const std::string target = argv[1];
  const auto requests = read_requests(argv[2]);
  const int callers = std::stoi(argv[3]);
  const auto warmup = std::chrono::duration<double>(std::stod(argv[4]));
  const auto measured = std::chrono::duration<double>(std::stod(argv[5]));
  if (requests.empty() || callers < 1) {
    std::fprintf(stderr, "no requests in %s, or no callers\n", argv[2]);
    return 2;
  }
  const auto start = Clock::now();
  const auto measure_from = start + std::chrono::duration_cast<Clock::duration>(warmup);
  const auto stop_at = measure_from + std::chrono::duration_cast<Clock::duration>(measured);
  std::vector<std::vector<double>> latencies(callers);
  std::vector<Clock::time_point> last_answer(callers, measure_from);
  std::atomic<long> errors{0};
  double cpu_at_start = 0.0;
  std::atomic<bool> cpu_marked{false};

  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c) {
    threads.emplace_back([&, c] {
      grpc::ChannelArguments arguments;
      arguments.SetInt("avrec.caller", c);  // a channel (and connection) per caller
      auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(),
                                               arguments);
      auto stub = avrec::v1::RankingService::NewStub(channel);
      size_t next = static_cast<size_t>(c) * 7919;
      while (true) {
        const auto sent = Clock::now();
        if (sent >= stop_at) break;
        if (sent >= measure_from && !cpu_marked.exchange(true)) cpu_at_start = cpu_seconds();
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
        avrec::v1::RankResponse response;
        const auto status = stub->Rank(&context, requests[next++ % requests.size()], &response);
        const auto answered = Clock::now();
        if (sent < measure_from) continue;
        if (!status.ok()) {
          ++errors;
          continue;
        }
        latencies[c].push_back(std::chrono::duration<double, std::milli>(answered - sent).count());
        last_answer[c] = answered;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const double cpu = cpu_seconds() - cpu_at_start;

  std::vector<double> all;
  for (const auto& some : latencies) all.insert(all.end(), some.begin(), some.end());
  std::sort(all.begin(), all.end());
  const auto end = *std::max_element(last_answer.begin(), last_answer.end());
  const double wall = std::chrono::duration<double>(end - measure_from).count();
  std::printf(
      "{\"calls\": %zu, \"errors\": %ld, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
      "\"p99_ms\": %.4f, \"max_ms\": %.4f, \"rate\": %.2f, \"client_cpu_s\": %.4f, "
      "\"wall_s\": %.4f}\n",
      all.size(), errors.load(), percentile(all, 0.5), percentile(all, 0.9),
      percentile(all, 0.99), all.empty() ? 0.0 : all.back(), wall > 0 ? all.size() / wall : 0.0,
      cpu, wall);
  return 0;
}
