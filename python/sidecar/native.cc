// sidecar._native: the pybind11 module over libsidecar that the Python package (sidecar/*.py)
// wraps. Python never touches KJ or the C++ Sidecar directly: every call is queued to the rank's
// OwnerThread and answered through a Python callback `done(result, error)`, called on the owner
// thread with the GIL held (the Python layer turns it into a concurrent or an asyncio future).
//
// Results handed to `done`:
//   recv:  ("tensor", dtype_code, shape, ArenaBuffer) | ("object", type_tag, bytes) | ("end",)
// An ArenaBuffer exposes the chunk's arena bytes through the buffer protocol (numpy.frombuffer
// views it without a copy) and keeps the Python Sidecar alive. No numpy C API here: the module
// works with whatever numpy (1.x or 2.x) the interpreter has.
//   others: None
// Errors: the exception instance sidecar.errors.from_native(code, message) returns.
//
// GIL discipline: a Python thread never waits for the owner thread while holding the GIL (the
// constructor and shutdown() release it; the Python layer waits on futures), because the owner
// thread takes the GIL to call `done`.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "owner_thread.h"

namespace py = pybind11;

namespace sidecar::python {
namespace {

// A Python callable that the owner thread may drop: its reference is released under the GIL.
class PyCallback {
 public:
  explicit PyCallback(py::object fn) : fn_(std::move(fn)) {}
  ~PyCallback() {
    py::gil_scoped_acquire gil;
    fn_ = py::object();
  }
  PyCallback(const PyCallback&) = delete;
  PyCallback& operator=(const PyCallback&) = delete;

  // Calls fn(result, error); the GIL must be held. A Python exception in the callback is
  // reported as unraisable (it has no caller to go to), never thrown into the owner thread.
  void call(const py::object& result, const py::object& error) {
    try {
      fn_(result, error);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("sidecar completion callback");
    }
  }

 private:
  py::object fn_;
};
using Callback = std::shared_ptr<PyCallback>;

py::object toPython(const Error& error) {
  return py::module_::import("sidecar.errors").attr("from_native")(toString(error.code()), error.what());
}

// Takes the GIL before it touches any Python object: even py::none() changes a reference count
// (pybind11 >= 3 aborts when that happens without the GIL).
void succeed(const Callback& done) {
  py::gil_scoped_acquire gil;
  done->call(py::none(), py::none());
}

void fail(const Callback& done, const Error& error) {
  py::gil_scoped_acquire gil;
  py::object exception;
  try {
    exception = toPython(error);
  } catch (py::error_already_set& e) {  // sidecar.errors cannot be imported (interpreter exit)
    e.discard_as_unraisable("sidecar error conversion");
    exception = py::reinterpret_steal<py::object>(PyObject_CallFunction(PyExc_RuntimeError, "s", error.what()));
  }
  done->call(py::none(), exception);
}

Error shutDown() {
  return Error(ErrorCode::kNotRegistered, "this Sidecar was shut down; create a new one to go on");
}

Dtype dtypeOf(int code) {
  if (code < 0 || code > static_cast<int>(Dtype::kFloat64)) {
    throw Error(ErrorCode::kInvalidArgument, "unknown dtype code " + std::to_string(code));
  }
  return static_cast<Dtype>(code);
}

// A received chunk's bytes in the arena, for numpy.frombuffer. Holds `anchor` (the Python
// Sidecar), so the arena stays mapped while a view exists and the Sidecar is not shut down.
struct ArenaBuffer {
  void* data;
  py::ssize_t sizeBytes;
  std::shared_ptr<PyCallback> anchor;
};

class NativeSidecar {
 public:
  NativeSidecar(int32_t rank, std::vector<int32_t> group, int sendDtype, std::vector<int64_t> sendRowShape,
                int recvDtype, std::vector<int64_t> recvRowShape, bool concurrentCopy, std::string socketPath) {
    RankConfig config;
    config.rank = rank;
    config.group = std::move(group);
    config.sendHint = {dtypeOf(sendDtype), std::move(sendRowShape)};
    config.recvHint = {dtypeOf(recvDtype), std::move(recvRowShape)};
    config.concurrentCopy = concurrentCopy;
    if (!socketPath.empty()) config.socketPath = std::move(socketPath);
    py::gil_scoped_release release;
    owner_ = std::make_unique<OwnerThread>(config);
  }

  ~NativeSidecar() {
    if (owner_ && owner_->onOwnerThread()) {
      // The last reference went away in a completion on the owner thread (a callback or a
      // recv's keep-alive): it cannot join itself, so a helper thread stops and frees it.
      std::thread([owner = std::move(owner_)]() mutable { owner.reset(); }).detach();
      return;
    }
    py::gil_scoped_release release;  // the owner thread takes the GIL for its last callbacks
    owner_.reset();
  }

  // `data` is the address of a CPU tensor that the caller keeps alive (and unchanged) until
  // `copied` is called: the bytes are copied into the arena on the owner thread.
  void sendTensor(std::string id, int dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
                  uintptr_t data, Groups destinations, uint32_t chunkId, uint32_t numChunks,
                  py::object copied, py::object acked) {
    TensorRef tensor{dtypeOf(dtype), std::move(shape), std::move(strides), reinterpret_cast<const void*>(data)};
    post([id = std::move(id), tensor = std::move(tensor), destinations = std::move(destinations), chunkId,
          numChunks](Sidecar& sidecar) { return sidecar.send(id, tensor, destinations, chunkId, numChunks); },
         wrap(std::move(copied)), wrap(std::move(acked)));
  }

  // A CUDA tensor: libsidecar hands the daemon an IPC handle and an event recorded on `stream`
  // (a cudaStream_t as an int; 0 the legacy default stream); the daemon copies it off the GPU.
  // The caller keeps the tensor alive and unchanged until `acked` (the Python layer waits for it).
  void sendDeviceTensor(std::string id, int dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
                        uintptr_t data, int32_t device, uintptr_t stream, Groups destinations, uint32_t chunkId,
                        uint32_t numChunks, py::object issued, py::object acked) {
    DeviceTensorRef tensor{dtypeOf(dtype), std::move(shape), std::move(strides), reinterpret_cast<void*>(data),
                           device, reinterpret_cast<void*>(stream)};
    post([id = std::move(id), tensor = std::move(tensor), destinations = std::move(destinations), chunkId,
          numChunks](Sidecar& sidecar) { return sidecar.send(id, tensor, destinations, chunkId, numChunks); },
         wrap(std::move(issued)), wrap(std::move(acked)));
  }

  void sendObject(std::string id, uint32_t typeTag, py::bytes bytes, Groups destinations, uint32_t chunkId,
                  uint32_t numChunks, py::object issued, py::object acked) {
    Object object{typeTag, std::string(bytes)};
    post([id = std::move(id), object = std::move(object), destinations = std::move(destinations), chunkId,
          numChunks](Sidecar& sidecar) { return sidecar.send(id, object, destinations, chunkId, numChunks); },
         wrap(std::move(issued)), wrap(std::move(acked)));
  }

  void closeStream(std::string id, uint32_t numChunks, Groups destinations, py::object done) {
    Callback callback = wrap(std::move(done));
    postOrFail(callback, [id = std::move(id), numChunks, destinations = std::move(destinations),
                          callback](Sidecar& sidecar) {
      try {
        sidecar.closeStream(id, numChunks, destinations);
      } catch (const Error& e) {
        return fail(callback, e);
      }
      succeed(callback);
    });
  }

  void markDone(std::string id, uint32_t chunkId, py::object done) {
    Callback callback = wrap(std::move(done));
    postOrFail(callback, [id = std::move(id), chunkId, callback](Sidecar& sidecar) {
      try {
        sidecar.markDone(id, chunkId);
      } catch (const Error& e) {
        return fail(callback, e);
      }
      succeed(callback);
    });
  }

  // Never blocks the owner thread: the recv waits in the daemon and `done` runs when it answers.
  void recv(std::string id, uint32_t chunkId, uint32_t timeoutMs, py::object done, py::object keepAlive) {
    Callback callback = wrap(std::move(done));
    // Received tensors hold `keepAlive` (the Python Sidecar) so their memory stays mapped as
    // long as the Python Sidecar is not shut down.
    auto anchor = std::make_shared<PyCallback>(std::move(keepAlive));
    OwnerThread* owner = owner_.get();
    postOrFail(callback, [id = std::move(id), chunkId, timeoutMs, callback, anchor, owner](Sidecar& sidecar) {
      RecvHandle handle;
      try {
        handle = sidecar.recvAsync(id, chunkId, timeoutMs);
      } catch (const Error& e) {
        return fail(callback, e);
      }
      uint64_t key = owner->addPending([callback] {
        fail(callback, Error(ErrorCode::kCancelled, "recv: the Sidecar was shut down while waiting"));
      });
      handle.onDone([callback, anchor, owner, key](Received* received, const Error* error) {
        owner->removePending(key);
        if (error != nullptr) return fail(callback, *error);
        py::gil_scoped_acquire gil;
        py::object result;
        try {
          result = convert(*received, anchor);
        } catch (py::error_already_set& e) {
          e.discard_as_unraisable("sidecar recv conversion");
          return;
        }
        callback->call(result, py::none());
      });
    });
  }

  void shutdown() {
    py::gil_scoped_release release;
    owner_->stop();
  }

 private:
  static Callback wrap(py::object fn) { return std::make_shared<PyCallback>(std::move(fn)); }

  static py::object convert(Received& received, const std::shared_ptr<PyCallback>& anchor) {
    switch (received.kind) {
      case Received::Kind::kTensor: {
        const TensorView& t = received.tensor;
        py::tuple shape(t.shape.size());
        for (size_t i = 0; i < t.shape.size(); ++i) shape[i] = py::int_(t.shape[i]);
        ArenaBuffer buffer{const_cast<void*>(t.data), static_cast<py::ssize_t>(t.sizeBytes), anchor};
        return py::make_tuple("tensor", static_cast<int>(t.dtype), shape, py::cast(std::move(buffer)));
      }
      case Received::Kind::kObject:
        return py::make_tuple("object", received.object.typeTag, py::bytes(received.object.bytes));
      case Received::Kind::kEndOfStream:
        break;
    }
    return py::make_tuple("end");
  }

  // The shared shape of the two sends: `start` issues the send (copying a tensor into the arena);
  // `first` is told when that is over (or failed), `acked` when the daemon has the chunk.
  void post(std::function<SendHandle(Sidecar&)> start, Callback first, Callback acked) {
    OwnerThread* owner = owner_.get();
    postOrFail(first, [start = std::move(start), first, acked, owner](Sidecar& sidecar) {
      SendHandle handle;
      try {
        handle = start(sidecar);
      } catch (const Error& e) {
        return fail(first, e);  // the caller raises it; `acked` is never called
      }
      succeed(first);
      uint64_t key = owner->addPending([acked] {
        fail(acked, Error(ErrorCode::kCancelled, "send: the Sidecar was shut down before the daemon answered"));
      });
      handle.onDone([acked, owner, key](const Error* error) {
        owner->removePending(key);
        if (error != nullptr) return fail(acked, *error);
        succeed(acked);
      });
    });
  }

  void postOrFail(const Callback& callback, OwnerThread::Command command) {
    if (!owner_->post(std::move(command))) throw shutDown();
  }

  std::unique_ptr<OwnerThread> owner_;
};

}  // namespace
}  // namespace sidecar::python

PYBIND11_MODULE(_native, m) {
  using sidecar::python::NativeSidecar;
  m.doc() = "libsidecar for the sidecar package (internal: use sidecar.Sidecar)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const sidecar::Error& e) {
      py::object error = sidecar::python::toPython(e);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
    }
  });

  py::class_<sidecar::python::ArenaBuffer>(m, "ArenaBuffer", py::buffer_protocol())
      .def_buffer([](sidecar::python::ArenaBuffer& b) {
        // Writable, like the reference's tensors; writes change what other receivers see.
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1, {b.sizeBytes}, {1}, false);
      })
      .def("__len__", [](const sidecar::python::ArenaBuffer& b) { return b.sizeBytes; });

  py::class_<NativeSidecar>(m, "NativeSidecar")
      .def(py::init<int32_t, std::vector<int32_t>, int, std::vector<int64_t>, int, std::vector<int64_t>, bool,
                    std::string>(),
           py::arg("rank"), py::arg("group"), py::arg("send_dtype"), py::arg("send_row_shape"),
           py::arg("recv_dtype"), py::arg("recv_row_shape"), py::arg("concurrent_copy"), py::arg("socket_path"))
      .def("send_tensor", &NativeSidecar::sendTensor)
      .def("send_device_tensor", &NativeSidecar::sendDeviceTensor)
      .def("send_object", &NativeSidecar::sendObject)
      .def("close_stream", &NativeSidecar::closeStream)
      .def("mark_done", &NativeSidecar::markDone)
      .def("recv", &NativeSidecar::recv)
      .def("shutdown", &NativeSidecar::shutdown);

  m.attr("DTYPE_CODES") = py::dict(
      py::arg("bool") = 0, py::arg("uint8") = 1, py::arg("int8") = 2, py::arg("int16") = 3, py::arg("int32") = 4,
      py::arg("int64") = 5, py::arg("float16") = 6, py::arg("bfloat16") = 7, py::arg("float32") = 8,
      py::arg("float64") = 9);
}
