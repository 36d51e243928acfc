//! Built-in handlers and the handlers file that names and configures them.

pub mod command;
pub mod echo;
pub mod http;
