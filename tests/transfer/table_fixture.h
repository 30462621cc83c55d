#pragma once
// Shared helpers for the transfer table suites: a fake Hooks that tracks every allocation handed to
// the table (no double release, nothing leaked), recording waiters, and payload builders.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "transfer/transfer_table.h"

namespace sidecar::transfer::testing {

class FakeHooks : public TransferTable::Hooks {
 public:
  void release(const shm::Allocation& allocation) override {
    ++releases;
    auto it = live.find(allocation.offset);
    if (it == live.end()) {
      ADD_FAILURE() << "release of an allocation that is not live (double release?) at offset "
                    << allocation.offset;
      return;
    }
    EXPECT_EQ(it->second, allocation) << "released allocation differs from the one handed out";
    live.erase(it);
  }
  uint64_t nowMs() override { return now; }

  // A fresh allocation of at least `bytes` (unique offset even for 0 bytes).
  shm::Allocation allocate(uint64_t bytes, uint64_t hint = 64) {
    uint64_t units = (bytes + hint - 1) / hint;
    shm::Allocation a{nextOffset, units * hint, units, hint};
    nextOffset += a.sizeBytes + 4096;
    live.emplace(a.offset, a);
    return a;
  }
  // The caller frees an allocation the table refused.
  void callerFree(const shm::Allocation& allocation) {
    auto it = live.find(allocation.offset);
    ASSERT_NE(it, live.end()) << "caller frees an allocation the table already released";
    live.erase(it);
  }
  bool isLive(uint64_t offset) const { return live.count(offset) != 0; }

  std::map<uint64_t, shm::Allocation> live;
  uint64_t releases = 0;
  uint64_t now = 1'000'000;
  uint64_t nextOffset = 4096;
};

// Records its completions; `onComplete` runs inside complete() (re-entrancy tests).
class TestWaiter : public RecvWaiter {
 public:
  void complete(Result<RecvValue> result) override {
    ++calls;
    if (auto* value = std::get_if<RecvValue>(&result)) {
      value_ = *value;
      error_.reset();
    } else {
      error_ = std::get<Error>(result);
      value_.reset();
    }
    if (onComplete) onComplete(*this);
  }

  bool done() const { return calls > 0; }
  bool isError() const { return error_.has_value(); }
  Errc code() const { return error_ ? error_->code : static_cast<Errc>(-1); }
  const std::string& message() const { return error_->message; }
  bool isEnd() const { return value_ && std::holds_alternative<EndOfStream>(*value_); }
  const TensorChunk* tensor() const {
    if (!value_) return nullptr;
    auto* p = std::get_if<const TensorChunk*>(&*value_);
    return p ? *p : nullptr;
  }
  const ObjectChunk* object() const {
    if (!value_) return nullptr;
    auto* p = std::get_if<const ObjectChunk*>(&*value_);
    return p ? *p : nullptr;
  }
  void reset() {
    calls = 0;
    value_.reset();
    error_.reset();
  }

  int calls = 0;
  std::function<void(TestWaiter&)> onComplete;

 private:
  std::optional<RecvValue> value_;
  std::optional<Error> error_;
};

inline ObjectChunk object(std::string bytes, uint32_t tag = 1) { return ObjectChunk{tag, std::move(bytes)}; }

template <typename T>
bool isOk(const Result<T>& r) {
  return std::holds_alternative<T>(r);
}
template <typename T>
std::optional<Errc> codeOf(const Result<T>& r) {
  if (auto* e = std::get_if<Error>(&r)) return e->code;
  return std::nullopt;
}
template <typename T>
std::string messageOf(const Result<T>& r) {
  if (auto* e = std::get_if<Error>(&r)) return e->message;
  return "";
}

class TableTest : public ::testing::Test {
 protected:
  void SetUp() override { makeTable(); }
  void TearDown() override {
    if (table) {
      table->checkInvariants();
      table.reset();
    }
    EXPECT_TRUE(hooks.live.empty()) << hooks.live.size() << " allocation(s) leaked";
  }
  void makeTable(TransferLimits limits = {}) {
    table.reset();
    table = std::make_unique<TransferTable>(hooks, limits);
  }

  TensorChunk tensor(Dtype dtype, std::vector<int64_t> shape, uint64_t hint = 64) {
    uint64_t count = 1;
    for (int64_t d : shape) count *= static_cast<uint64_t>(d);
    TensorChunk t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.sizeBytes = count * dtypeBytes(dtype);
    t.allocation = hooks.allocate(t.sizeBytes, hint);
    return t;
  }

  // send() that frees a refused tensor as the caller must, and checks the invariants.
  Result<Ok> send(Rank sender, const Group& group, const std::string& id, uint32_t chunk,
                  uint32_t numChunks, const std::vector<Group>& dests, Payload payload) {
    std::optional<shm::Allocation> allocation;
    if (auto* t = std::get_if<TensorChunk>(&payload)) allocation = t->allocation;
    auto result = table->send(sender, group, id, chunk, numChunks, dests, std::move(payload));
    if (!isOk(result) && allocation && hooks.isLive(allocation->offset)) hooks.callerFree(*allocation);
    table->checkInvariants();
    return result;
  }
  Result<Ok> sendObject(Rank sender, const Group& group, const std::string& id, uint32_t chunk,
                        uint32_t numChunks, const std::vector<Group>& dests, std::string bytes) {
    return send(sender, group, id, chunk, numChunks, dests, object(std::move(bytes)));
  }
  Result<Ok> markDone(Rank r, const std::string& id, uint32_t chunk) {
    auto result = table->markDone(r, id, chunk);
    table->checkInvariants();
    return result;
  }
  void recv(Rank r, const std::string& id, uint32_t chunk, TestWaiter& w) {
    table->recv(r, id, chunk, w);
    table->checkInvariants();
  }

  FakeHooks hooks;
  std::unique_ptr<TransferTable> table;
};

}  // namespace sidecar::transfer::testing
