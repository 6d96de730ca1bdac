//! The one place where failures become HTTP responses.
//!
//! Every error a client can see is JSON `{"error": "<code>", "message": "<text>"}`
//! with a fitting status; handlers return [`ApiError`] and [`recover`] turns it
//! (and warp's own rejections) into that shape. Messages never carry tokens or
//! secrets.

use std::convert::Infallible;

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use crate::auth::AuthError;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub(crate) status: StatusCode,
    /// Stable machine-readable code.
    pub(crate) code: &'static str,
    /// Human-readable explanation.
    pub(crate) message: String,
    /// Seconds for a `Retry-After` header, for refusals that pass.
    pub(crate) retry_after: Option<u64>,
}

impl warp::reject::Reject for ApiError {}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 Bad Request.
    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// Adds a `Retry-After` header.
    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON response.
    pub(crate) fn to_response(&self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: &self.message,
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        if err == AuthError::KeysUnavailable {
            // Not the client's fault: the node cannot check tokens yet.
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "keys_unavailable",
                err.to_string(),
            )
            .retry_after(5);
        }
        let (status, code) = if err.is_unauthenticated() {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        } else {
            (StatusCode::FORBIDDEN, "forbidden")
        };
        ApiError::new(status, code, err.to_string())
    }
}

/// Turns any rejection into the JSON error shape.
pub(crate) async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(error) = rejection.find::<ApiError>() {
        error.clone()
    } else if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        )
    } else if let Some(forbidden) = rejection.find::<warp::filters::cors::CorsForbidden>() {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "cors_forbidden",
            forbidden.to_string(),
        )
    } else if let Some(missing) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request("missing_header", missing.to_string())
    } else if let Some(invalid) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request("invalid_header", invalid.to_string())
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        ApiError::bad_request("bad_request", "the request could not be processed")
    };
    Ok(error.to_response())
}
