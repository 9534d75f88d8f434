//! Tests of the dates module: tables per input form and zone, JSON and form bodies, property tests.

mod convert_table;
pub(crate) mod gen_json;
mod json_bodies;
mod json_props;
mod reference;
