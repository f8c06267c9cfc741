//! The client side of the API, for `concatd submit --api`.
