// The native front end's C++ half: grpc++ completion-queue threads that accept every call, read its
// messages and hand them to Python in bulk, and send back what Python answers.
//
// No Python object is touched here and the GIL is never taken: the completion-queue threads append
// events to one locked vector and write an eventfd when it stops being empty; the Python thread
// (the asyncio loop) drains the whole vector in one go. Answers go the other way the same way:
// Python posts writes and finishes to one locked vector and, once per event-loop pass, wakes a
// sender thread that starts them all, so sending (HTTP/2 framing, the socket write) costs the
// Python thread nothing.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

namespace hotpath {

class Core;
class Call;

enum EventKind : int {
  kEventMessage = 0,    // a request message arrived (the first one opens the call)
  kEventHalfClose = 1,  // the client sent its last message (streaming calls, or a unary call without one)
  kEventCancelled = 2,  // the call ended without the server finishing it: client cancel, deadline, disconnect
};

struct Event {
  int kind;
  Call* call;  // holds one reference, handed to whoever drains the event
  grpc::ByteBuffer message;
};

enum TagOp : int { kOpRequest, kOpRead, kOpWrite, kOpFinish, kOpDone };

struct Tag {
  Call* call;
  TagOp op;
};

// One RPC. Reference-counted: one reference per operation in flight, one per event queued for Python
// and one for Python's handle once it holds one; deleted when the last goes.
class Call {
 public:
  Call(Core* core, grpc::ServerCompletionQueue* cq);

  const std::string& method() const { return ctx_.method(); }
  bool streaming() const { return streaming_; }
  // time.monotonic_ns() at which the call's deadline passes; 0 when it has none.
  int64_t deadline_ns() const { return deadline_ns_; }
  // The client's metadata as "key\0value\0" pairs, binary values as sent.
  std::string metadata() const;
  // The client's address as gRPC names it, e.g. "ipv4:127.0.0.1:50000" (not authenticated).
  std::string peer() const { return ctx_.peer(); }
  // The common name and subject alternative names of the client certificate that mutual TLS
  // verified, each followed by '\0'; empty when the client was not verified. Call from one thread.
  std::string identities() const;

  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref();

  bool py_owned = false;  // whether Python holds a handle (only the draining thread reads or sets it)
  void* py_handle = nullptr;

 private:
  friend class Core;
  void Proceed(TagOp op, bool ok);
  // Send one message of a streaming call; messages queue behind the one being written.
  void Write(grpc::ByteBuffer&& message);
  // End the call with a status and, for a unary call, its one response message when it has one.
  void Finish(grpc::Status&& status, grpc::ByteBuffer&& response, bool has_response);
  void StartRead();
  void StartWriteLocked(grpc::ByteBuffer&& buffer);
  void StartFinishLocked();

  Core* core_;
  grpc::ServerCompletionQueue* cq_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer read_buffer_;
  bool streaming_ = false;
  int64_t deadline_ns_ = 0;
  std::atomic<int> refs_{1};
  std::mutex mu_;
  std::deque<grpc::ByteBuffer> writes_;
  bool writing_ = false;
  bool finish_wanted_ = false;
  bool finished_ = false;
  bool write_failed_ = false;
  grpc::Status status_;
  Tag request_tag_, read_tag_, write_tag_, finish_tag_, done_tag_;
};

// A write or finish that Python asked for, waiting for the sender thread to start it.
struct PostedOp {
  Call* call;  // holds one reference until the operation has started
  bool finish;
  grpc::Status status;
  grpc::ByteBuffer message;
  bool has_message;
};

struct Options {
  int max_message_bytes = 64 * 1024 * 1024;
  int threads = 1;
  int keepalive_time_ms = 7200000;
  int keepalive_timeout_ms = 20000;
  int keepalive_min_ping_interval_ms = 10000;
  int max_connection_age_ms = 0;
  std::vector<std::string> streaming_methods;
  // With a certificate chain and its key the port speaks TLS only; with a client CA as well, every
  // client must present a certificate that CA signed (mutual TLS). gRPC re-reads the files every
  // tls_reload_s seconds, so a renewed certificate is served without a restart.
  std::string tls_cert_path;
  std::string tls_key_path;
  std::string tls_client_ca_path;
  int tls_reload_s = 60;
};

class Core {
 public:
  Core();
  ~Core();

  // Listen on `address` (host:port, port 0 picks one) and start serving; returns the bound port, or
  // 0 with a reason in `error` when gRPC cannot listen there.
  int Start(const std::string& address, const Options& options, std::string* error);
  int event_fd() const { return event_fd_; }
  // Move every queued event into `out` (which it clears first) and consume the eventfd's count.
  void Drain(std::vector<Event>* out);
  // Queue one message of a streaming call; true when the queue was empty, so a Wake() is due.
  bool PostWrite(Call* call, const char* data, size_t size);
  // Queue the end of a call: a status code, its message and, for unary OK, the response; true when
  // the queue was empty, so a Wake() is due.
  bool PostFinish(Call* call, int code, const std::string& details, const char* data, size_t size, bool has_response);
  // Have the sender thread start everything posted so far.
  void Wake();
  // Stop accepting, let calls in flight finish for up to `grace_s` seconds, then cancel the rest.
  void Shutdown(double grace_s);
  // After Shutdown: stop the completion queues and join their threads. Call from the thread that
  // finishes calls, after its last Finish or Write.
  void Close();

 private:
  friend class Call;
  void Push(Event&& event);
  void RequestCall(grpc::ServerCompletionQueue* cq);
  // Plaintext, TLS or mutual TLS, as the options say; keeps the certificate watcher alive.
  std::shared_ptr<grpc::ServerCredentials> Credentials(const Options& options);
  bool Post(PostedOp&& op);
  void Send();
  void Serve(grpc::ServerCompletionQueue* cq);
  bool is_streaming(const std::string& method) const { return streaming_methods_.count(method) > 0; }

  grpc::AsyncGenericService service_;
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> certificates_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs_;
  std::vector<std::thread> threads_;
  std::set<std::string> streaming_methods_;
  std::mutex posted_mu_;
  std::condition_variable posted_cv_;
  std::vector<PostedOp> posted_;
  bool sender_stop_ = false;
  std::thread sender_;
  std::mutex events_mu_;
  std::vector<Event> events_;
  int event_fd_ = -1;
  // Operations start under the shared side; Close takes the exclusive side to forbid new ones
  // before shutting the completion queues, which gRPC requires to receive no further work.
  std::shared_mutex ops_mu_;
  bool closed_ = false;
  bool started_ = false;
};

}  // namespace hotpath
