#include "reactor/mailbox.h"

namespace sidecar::reactor {

Mailbox::Mailbox(Reactor& owner) : owner_(owner) { owner_.addSource(*this); }

Mailbox::~Mailbox() {
  owner_.removeSource(*this);
  Node* node = head_.exchange(nullptr, std::memory_order_acquire);
  while (node != nullptr) {
    Node* next = node->next;
    delete node;
    node = next;
  }
}

void Mailbox::post(std::function<void()> task) {
  Node* node = new Node{std::move(task), head_.load(std::memory_order_relaxed)};
  while (!head_.compare_exchange_weak(node->next, node, std::memory_order_release,
                                      std::memory_order_relaxed)) {
  }
  owner_.wake();
}

bool Mailbox::poll() {
  Node* node = head_.exchange(nullptr, std::memory_order_acquire);
  if (node == nullptr) return false;
  // The list is newest-first; reverse it so tasks run in posting order.
  Node* ordered = nullptr;
  while (node != nullptr) {
    Node* next = node->next;
    node->next = ordered;
    ordered = node;
    node = next;
  }
  while (ordered != nullptr) {
    Node* next = ordered->next;
    ordered->task();
    delete ordered;
    delivered_++;
    ordered = next;
  }
  return true;
}

}  // namespace sidecar::reactor
