//! corepush placeholder
