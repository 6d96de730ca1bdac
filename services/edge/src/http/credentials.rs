//! Where a request's credential is read from.
//!
//! A stream's token may come in the `Authorization: Bearer` header, the
//! `access_token` query parameter (read by `StreamRequest::parse` with the
//! other parameters) or the [`TOKEN_COOKIE`] cookie, since browsers'
//! `EventSource` cannot set headers. Publisher endpoints accept only the
//! header: [`require_publisher`] is the one check every such endpoint runs.

use warp::http::{HeaderMap, StatusCode};

use super::errors::ApiError;
use crate::auth::{Authenticator, Publisher};

/// Name of the cookie that may carry the token.
pub(crate) const TOKEN_COOKIE: &str = "herald_token";

/// The token from `Authorization: Bearer <jwt>`, if that header is present.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("authorization") else {
        return Ok(None);
    };
    let value = value.to_str().ok().and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    match value {
        Some(token) => Ok(Some(token.trim().to_owned())),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the Authorization header must be \"Bearer <jwt>\"",
        )),
    }
}

/// The token from the [`TOKEN_COOKIE`] cookie, if one is sent.
pub(crate) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == TOKEN_COOKIE).then(|| value.to_owned())
        })
}

/// The publisher behind the request's `Authorization: Bearer` header: 401
/// when there is none or the header is malformed, and the authenticator's
/// refusal (401 or 403) when the token is not a valid publisher credential.
/// What the publisher may do is the endpoint's to check.
pub(crate) async fn require_publisher(
    auth: &Authenticator,
    headers: &HeaderMap,
) -> Result<std::sync::Arc<Publisher>, ApiError> {
    let token = bearer_token(headers)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no credential: send Authorization: Bearer <publisher jwt>",
        )
    })?;
    auth.publisher(&token).await.map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn a_bearer_token_is_read_in_either_case_and_trimmed() {
        let token = bearer_token(&headers(&[("authorization", "bearer abc ")]));
        assert_eq!(token.ok().flatten().as_deref(), Some("abc"));
        assert!(matches!(bearer_token(&headers(&[])), Ok(None)));
    }

    #[test]
    fn an_authorization_header_of_another_scheme_is_refused() {
        assert!(bearer_token(&headers(&[("authorization", "Basic abc")])).is_err());
    }

    #[test]
    fn the_token_cookie_is_found_among_other_cookies_in_any_cookie_header() {
        let token = cookie_token(&headers(&[
            ("cookie", "a=1"),
            ("cookie", "b=2; herald_token=xyz; c=3"),
        ]));
        assert_eq!(token.as_deref(), Some("xyz"));
        assert_eq!(
            cookie_token(&headers(&[("cookie", "herald_tokens=1")])),
            None
        );
    }
}
