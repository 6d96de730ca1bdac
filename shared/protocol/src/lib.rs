//! Herald's wire vocabulary, shared by the edge node, the tools and the tests.
//!
//! Layout:
//! - [`target`]: who an event is for ([`Target`]: a user or a topic), name rules,
//!   and the reversible encoding of a name into one NATS subject token.
//! - [`event_id`]: the SSE `id:` of an event ([`EventId`]: bus epoch + stream
//!   sequence) and the parser for `Last-Event-ID`.
//! - [`stream_position`]: where a stream stands in every target it follows
//!   ([`StreamPosition`]), the `id:` a multi-target stream writes and reads back.
//! - [`event_type`]: the validated SSE `event:` name ([`EventType`]).
//! - [`msg_id`]: the validated publisher idempotency key ([`MsgId`]).
//! - [`trace_context`]: the publisher's W3C trace context ([`TraceParent`]).
//! - [`sse`]: the SSE frame encoder (which no field value can break) and a
//!   spec-conformant parser used by clients and tests.

pub mod event_id;
pub mod event_type;
pub mod msg_id;
pub mod sse;
pub mod stream_position;
pub mod target;
pub mod trace_context;

pub use event_id::{EncodedId, Epoch, EventId, EventIdError};
pub use event_type::{EventType, EventTypeError};
pub use msg_id::{MsgId, MsgIdError};
pub use stream_position::{PositionError, StreamPosition, fingerprint_of};
pub use target::{Target, TargetError, TargetKind};
pub use trace_context::TraceParent;
