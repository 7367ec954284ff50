//! `GET /v1/accounts/{user}` (PROTOCOL 5, Accounts): the user itself or admin.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::Json;

use super::auth::{authenticate, unauthorized, Caller};
use super::errors::ApiError;
use super::HttpState;
use crate::storage::AccountView;

pub(crate) async fn get_account(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<AccountView>, ApiError> {
    let Path(user) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    match authenticate(&state, &method, &uri, &headers).await? {
        None => return Err(unauthorized(&state, "credentials required")),
        Some(Caller::Admin) => {}
        Some(Caller::User(u)) if u == user => {}
        Some(Caller::User(_)) => return Err(ApiError::forbidden("an account can see only itself")),
        Some(Caller::Token(_)) => {
            return Err(unauthorized(&state, "a store token does not open accounts"))
        }
    }
    match state.accounts.get(&user).await? {
        Some(a) => Ok(Json(a.view())),
        None => Err(ApiError::not_found(format!("no account {user}"))),
    }
}
