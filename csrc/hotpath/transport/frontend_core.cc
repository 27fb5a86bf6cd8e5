#include "hotpath/transport/frontend_core.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <utility>

namespace hotpath {

namespace {

// Calls requested ahead on each completion queue, so a burst of new calls never waits for a request.
constexpr int kCallsRequestedAhead = 64;

grpc::ByteBuffer CopyToBuffer(const char* data, size_t size) {
  grpc::Slice slice(data, size);
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

Call::Call(Core* core, grpc::ServerCompletionQueue* cq)
    : core_(core),
      cq_(cq),
      stream_(&ctx_),
      request_tag_{this, kOpRequest},
      read_tag_{this, kOpRead},
      write_tag_{this, kOpWrite},
      finish_tag_{this, kOpFinish},
      done_tag_{this, kOpDone} {
  ctx_.AsyncNotifyWhenDone(&done_tag_);
  core_->service_.RequestCall(&ctx_, &stream_, cq_, cq_, &request_tag_);
}

std::string Call::metadata() const {
  std::string out;
  for (const auto& [key, value] : ctx_.client_metadata()) {
    out.append(key.data(), key.size());
    out.push_back('\0');
    out.append(value.data(), value.size());
    out.push_back('\0');
  }
  return out;
}

std::string Call::identities() const {
  std::string out;
  std::shared_ptr<const grpc::AuthContext> auth = ctx_.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return out;
  for (const char* property : {GRPC_X509_CN_PROPERTY_NAME, GRPC_X509_SAN_PROPERTY_NAME}) {
    for (const grpc::string_ref& value : auth->FindPropertyValues(property)) {
      out.append(value.data(), value.size());
      out.push_back('\0');
    }
  }
  return out;
}

void Call::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
}

void Call::StartRead() {
  std::shared_lock<std::shared_mutex> ops(core_->ops_mu_);
  if (core_->closed_) {
    ops.unlock();
    Unref();
    return;
  }
  stream_.Read(&read_buffer_, &read_tag_);
}

void Call::StartWriteLocked(grpc::ByteBuffer&& buffer) {
  std::shared_lock<std::shared_mutex> ops(core_->ops_mu_);
  if (core_->closed_) return;
  writing_ = true;
  Ref();
  stream_.Write(buffer, &write_tag_);
}

void Call::StartFinishLocked() {
  std::shared_lock<std::shared_mutex> ops(core_->ops_mu_);
  finished_ = true;
  if (core_->closed_) return;
  Ref();
  stream_.Finish(status_, &finish_tag_);
}

void Call::Write(grpc::ByteBuffer&& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_ || finish_wanted_ || write_failed_) return;
  if (writing_) {
    writes_.push_back(std::move(message));
  } else {
    StartWriteLocked(std::move(message));
  }
}

void Call::Finish(grpc::Status&& status, grpc::ByteBuffer&& response, bool has_response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_ || finish_wanted_) return;
  status_ = std::move(status);
  if (has_response && !streaming_) {
    std::shared_lock<std::shared_mutex> ops(core_->ops_mu_);
    finished_ = true;
    if (core_->closed_) return;
    Ref();
    stream_.WriteAndFinish(response, grpc::WriteOptions(), status_, &finish_tag_);
  } else if (writing_) {
    finish_wanted_ = true;
  } else {
    StartFinishLocked();
  }
}

void Call::Proceed(TagOp op, bool ok) {
  switch (op) {
    case kOpRequest: {
      if (!ok) {  // the server is shutting down and will match no more calls
        Unref();
        return;
      }
      core_->RequestCall(cq_);
      Ref();  // for the done notification, now armed
      streaming_ = core_->is_streaming(ctx_.method());
      auto deadline = ctx_.deadline();
      if (deadline != std::chrono::system_clock::time_point::max()) {
        auto remaining = deadline - std::chrono::system_clock::now();
        deadline_ns_ = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::steady_clock::now().time_since_epoch() + remaining)
                           .count();
        if (deadline_ns_ <= 0) deadline_ns_ = 1;
      }
      StartRead();  // the request's reference becomes the read's
      return;
    }
    case kOpRead:
      if (ok) {
        Ref();  // for the event
        core_->Push(Event{kEventMessage, this, std::move(read_buffer_)});
        read_buffer_.Clear();
        if (streaming_) {
          StartRead();
        } else {
          Unref();
        }
      } else {
        core_->Push(Event{kEventHalfClose, this, grpc::ByteBuffer()});  // the read's reference becomes the event's
      }
      return;
    case kOpWrite: {
      {
        std::lock_guard<std::mutex> lock(mu_);
        writing_ = false;
        if (!ok) {
          write_failed_ = true;
          writes_.clear();
        }
        if (!writes_.empty()) {
          grpc::ByteBuffer next = std::move(writes_.front());
          writes_.pop_front();
          StartWriteLocked(std::move(next));
        } else if (finish_wanted_ && !finished_) {
          StartFinishLocked();
        }
      }
      Unref();
      return;
    }
    case kOpFinish:
      Unref();
      return;
    case kOpDone:
      if (ctx_.IsCancelled()) {
        core_->Push(Event{kEventCancelled, this, grpc::ByteBuffer()});  // the notification's reference becomes the event's
      } else {
        Unref();
      }
      return;
  }
}

std::shared_ptr<grpc::ServerCredentials> Core::Credentials(const Options& options) {
  if (options.tls_cert_path.empty()) return grpc::InsecureServerCredentials();
  bool mutual = !options.tls_client_ca_path.empty();
  certificates_ = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.tls_key_path, options.tls_cert_path, options.tls_client_ca_path,
      static_cast<unsigned int>(options.tls_reload_s < 1 ? 1 : options.tls_reload_s));
  grpc::experimental::TlsServerCredentialsOptions tls(certificates_);
  tls.watch_identity_key_cert_pairs();
  if (mutual) {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

Core::Core() : event_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}

Core::~Core() {
  if (started_ && !closed_) {
    Shutdown(0);
    Close();
  }
  server_.reset();
  cqs_.clear();
  if (event_fd_ >= 0) close(event_fd_);
}

int Core::Start(const std::string& address, const Options& options, std::string* error) {
  if (event_fd_ < 0) {
    *error = "eventfd() failed";
    return 0;
  }
  streaming_methods_.insert(options.streaming_methods.begin(), options.streaming_methods.end());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, Credentials(options), &port);
  builder.RegisterAsyncGenericService(&service_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  // One server owns its port: a second one started on it must fail, not share it silently.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, options.keepalive_time_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, options.keepalive_timeout_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, options.keepalive_min_ping_interval_ms);
  if (options.max_connection_age_ms > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, options.max_connection_age_ms);
  }
  int threads = options.threads < 1 ? 1 : options.threads;
  for (int i = 0; i < threads; ++i) cqs_.push_back(builder.AddCompletionQueue());
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    *error = "gRPC could not listen on " + address + " (address in use, or not an address of this machine)";
    server_.reset();
    for (auto& cq : cqs_) {
      cq->Shutdown();
      void* tag;
      bool ok;
      while (cq->Next(&tag, &ok)) {
      }
    }
    cqs_.clear();
    return 0;
  }
  started_ = true;
  sender_ = std::thread([this] { Send(); });
  for (auto& cq : cqs_) {
    grpc::ServerCompletionQueue* queue = cq.get();
    for (int k = 0; k < kCallsRequestedAhead; ++k) RequestCall(queue);
    threads_.emplace_back([this, queue] { Serve(queue); });
  }
  return port;
}

void Core::RequestCall(grpc::ServerCompletionQueue* cq) {
  std::shared_lock<std::shared_mutex> ops(ops_mu_);
  if (closed_) return;
  new Call(this, cq);
}

void Core::Serve(grpc::ServerCompletionQueue* cq) {
  void* raw;
  bool ok;
  while (cq->Next(&raw, &ok)) {
    Tag* tag = static_cast<Tag*>(raw);
    tag->call->Proceed(tag->op, ok);
  }
}

bool Core::PostWrite(Call* call, const char* data, size_t size) {
  return Post(PostedOp{call, false, grpc::Status(), CopyToBuffer(data, size), true});
}

bool Core::PostFinish(Call* call, int code, const std::string& details, const char* data, size_t size, bool has_response) {
  return Post(PostedOp{call, true, grpc::Status(static_cast<grpc::StatusCode>(code), details),
                has_response ? CopyToBuffer(data, size) : grpc::ByteBuffer(), has_response});
}

bool Core::Post(PostedOp&& op) {
  op.call->Ref();
  std::lock_guard<std::mutex> lock(posted_mu_);
  bool was_empty = posted_.empty();
  posted_.push_back(std::move(op));
  return was_empty;
}

void Core::Wake() { posted_cv_.notify_one(); }

void Core::Send() {
  std::vector<PostedOp> ops;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(posted_mu_);
      posted_cv_.wait(lock, [this] { return !posted_.empty() || sender_stop_; });
      if (posted_.empty()) return;
      ops.swap(posted_);
    }
    for (auto& op : ops) {
      if (op.finish) {
        op.call->Finish(std::move(op.status), std::move(op.message), op.has_message);
      } else {
        op.call->Write(std::move(op.message));
      }
      op.call->Unref();
    }
    ops.clear();
  }
}

void Core::Push(Event&& event) {
  bool was_empty;
  {
    std::lock_guard<std::mutex> lock(events_mu_);
    was_empty = events_.empty();
    events_.push_back(std::move(event));
  }
  if (was_empty) {
    uint64_t one = 1;
    // A full counter (2^64 - 2 unread wake-ups) cannot happen: the reader drains on every wake.
    ssize_t written = write(event_fd_, &one, sizeof(one));
    (void)written;
  }
}

void Core::Drain(std::vector<Event>* out) {
  uint64_t count;
  ssize_t got = read(event_fd_, &count, sizeof(count));
  (void)got;  // EAGAIN: nothing was signalled since the last drain, yet events may still be queued
  out->clear();
  std::lock_guard<std::mutex> lock(events_mu_);
  out->swap(events_);
}

void Core::Shutdown(double grace_s) {
  if (!started_) return;
  auto grace = std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(grace_s));
  server_->Shutdown(std::chrono::system_clock::now() + grace);
}

void Core::Close() {
  if (!started_) return;
  {
    std::unique_lock<std::shared_mutex> ops(ops_mu_);
    if (closed_) return;
    closed_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(posted_mu_);
    sender_stop_ = true;
  }
  posted_cv_.notify_one();
  sender_.join();
  for (auto& cq : cqs_) cq->Shutdown();
  for (auto& thread : threads_) thread.join();
  threads_.clear();
}

}  // namespace hotpath
