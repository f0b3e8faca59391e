//! Examples of `cluster` live as `[[example]]` targets of this package.
