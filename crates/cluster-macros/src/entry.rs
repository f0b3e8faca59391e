//! `#[cluster::main]`: argument parsing, signature checks and expansion.
//!
//! Modelled on `tokio-macros`' `entry.rs`: the body is not parsed (only split at top-level `;`
//! to find the span of its last statement), errors are `syn::Error`s combined into one, and on
//! error the function is still expanded as far as possible so that IDEs keep working.

use proc_macro2::{Delimiter, Group, Ident, Literal, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{
    Attribute, Expr, FnArg, Lit, Meta, MetaNameValue, PatType, Path, ReturnType, Signature, Token,
    Visibility,
};

/// The attribute's arguments: `workers = 4, flavor = "multi_thread"`.
type AttributeArgs = Punctuated<Meta, Token![,]>;

/// The arguments `#[cluster::main]` accepts, as listed in error messages.
const KEYS: [&str; 6] = [
    "workers",
    "flavor",
    "worker_threads",
    "settings",
    "env",
    "crate",
];

/// The flavor of the worker runtimes (the primary always runs on a current-thread runtime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    CurrentThread,
    MultiThread,
}

impl Flavor {
    /// Parses a `flavor = "..."` value, with a hint for likely misspellings.
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "current_thread" => return Ok(Self::CurrentThread),
            "multi_thread" => return Ok(Self::MultiThread),
            _ => {}
        }
        let normalized = value.trim().to_ascii_lowercase().replace(['-', ' '], "_");
        let hint = match normalized.as_str() {
            "current_thread" | "currentthread" | "current" => "did you mean `current_thread`?",
            "multi_thread" | "multithread" | "multi_threaded" | "multithreaded" | "multi" => {
                "did you mean `multi_thread`?"
            }
            "single_thread" | "single_threaded" | "singlethread" | "single" | "basic_scheduler"
            | "local" => "the single-threaded flavor is called `current_thread`",
            "threaded" | "threaded_scheduler" | "work_stealing" => {
                "the work-stealing flavor is called `multi_thread`"
            }
            _ => "the flavors are `current_thread` (the default) and `multi_thread`",
        };
        Err(format!("no such runtime flavor `{value}`: {hint}"))
    }
}

/// The arguments, once parsed. Each option keeps its argument for spanned errors.
#[derive(Default)]
struct Config {
    workers: Option<(usize, MetaNameValue)>,
    flavor: Option<Flavor>,
    worker_threads: Option<(usize, MetaNameValue)>,
    /// `settings = path`: the function whose `Settings` the options are applied on.
    settings: Option<syn::ExprPath>,
    /// `env = false`: whether the `CLUSTER_*` environment overrides apply (by default, yes).
    env: Option<bool>,
    crate_path: Option<Path>,
    /// The keys seen so far, valid or not, to report duplicates.
    seen: Vec<String>,
}

impl Config {
    /// Parses every argument, collecting the errors.
    fn parse(args: AttributeArgs, errors: &mut Errors) -> Self {
        let mut config = Self::default();
        for arg in args {
            errors.check(config.parse_arg(arg));
        }
        config
    }

    fn parse_arg(&mut self, arg: Meta) -> syn::Result<()> {
        let arg = match arg {
            Meta::NameValue(arg) => arg,
            Meta::Path(path) => return Err(bare_path_error(&path)),
            Meta::List(list) => {
                let key = key_of(&list.path)?;
                return Err(syn::Error::new_spanned(
                    &list,
                    format!("expected `{key} = ...`"),
                ));
            }
        };
        let key = key_of(&arg.path)?;
        if self.seen.contains(&key) {
            return Err(syn::Error::new_spanned(
                &arg,
                format!("`{key}` is set more than once"),
            ));
        }
        self.seen.push(key.clone());
        match key.as_str() {
            "workers" => {
                let workers = parse_int(&arg, "workers = 4")?;
                if workers == 0 {
                    let msg =
                        "`workers` must be at least 1 (leave it out to start one worker per CPU)";
                    return Err(syn::Error::new_spanned(&arg.value, msg));
                }
                self.workers = Some((workers, arg));
            }
            "worker_threads" => {
                let threads = parse_int(&arg, "worker_threads = 4")?;
                if threads == 0 {
                    return Err(syn::Error::new_spanned(
                        &arg.value,
                        "`worker_threads` must be at least 1",
                    ));
                }
                self.worker_threads = Some((threads, arg));
            }
            "flavor" => {
                let value = parse_str(&arg, "flavor = \"multi_thread\"")?;
                let flavor = Flavor::parse(&value.value())
                    .map_err(|msg| syn::Error::new_spanned(&value, msg))?;
                self.flavor = Some(flavor);
            }
            "settings" => self.settings = Some(parse_settings_path(&arg.value)?),
            "env" => match literal(&arg.value) {
                Some(Lit::Bool(value)) => self.env = Some(value.value),
                _ => {
                    let msg = "`env` must be `true` or `false`: `env = false` leaves out the \
                               `CLUSTER_*` environment overrides";
                    return Err(syn::Error::new_spanned(&arg.value, msg));
                }
            },
            "crate" => {
                let value = parse_str(&arg, "crate = \"cluster\"")?;
                let path = value.parse::<Path>().map_err(|_| {
                    let msg = format!(
                        "`crate` must be a path to the `cluster` crate, found \"{}\"",
                        value.value()
                    );
                    syn::Error::new_spanned(&value, msg)
                })?;
                self.crate_path = Some(path);
            }
            _ => unreachable!("key_of returns known keys only"),
        }
        Ok(())
    }

    /// Checks the options against each other and against the form of the function.
    fn validate(&self, form: &Form, errors: &mut Errors) {
        if let (Form::Role(_), Some((_, arg))) = (form, &self.workers) {
            let msg = "`workers` only applies to a function without parameters: a function taking a \
                       `cluster::Role` forks its workers itself, with `Primary::fork`";
            errors.push(syn::Error::new_spanned(arg, msg));
        }
        // With `settings = f` and no `flavor`, the flavor is whatever `f` sets: `configure`
        // checks it when the program starts.
        let flavor_unknown = self.flavor.is_none() && self.settings.is_some();
        if let Some((threads, arg)) = &self.worker_threads
            && self.flavor != Some(Flavor::MultiThread)
            && !flavor_unknown
        {
            let msg = format!(
                "`worker_threads` requires the `multi_thread` runtime flavor: use \
                 `#[cluster::main(flavor = \"multi_thread\", worker_threads = {threads})]`"
            );
            errors.push(syn::Error::new_spanned(arg, msg));
        }
    }

    /// The statements that compute the settings into `settings` (an identifier of the caller,
    /// so that the body cannot see it), for where `__private` is in scope: the `settings`
    /// function's or the defaults, the macro's own options on top, then `configure`.
    fn settings(&self, settings: &Ident, form: &Form) -> TokenStream {
        let start = match &self.settings {
            // `(path)()`, annotated with the type it must have: a function of another type is
            // reported at the path.
            Some(path) => {
                let (path_start, path_end) = span_range(path.to_token_stream());
                let mut callee = Group::new(Delimiter::Parenthesis, path.to_token_stream());
                callee.set_span(path_start);
                let mut call = Group::new(Delimiter::Parenthesis, TokenStream::new());
                call.set_span(path_end);
                let ty = quote_spanned!(path_start=> __private::Settings);
                quote! { let #settings: #ty = #callee #call; }
            }
            None => quote! { let #settings = __private::Settings::new(); },
        };
        let mut options = TokenStream::new();
        if let (Form::Workers, Some((workers, _))) = (form, &self.workers) {
            let workers = Literal::usize_suffixed(*workers);
            options.extend(quote! { .workers(#workers) });
        }
        match self.flavor {
            Some(Flavor::CurrentThread) => {
                options.extend(quote! { .flavor(__private::Flavor::CurrentThread) });
            }
            Some(Flavor::MultiThread) => {
                options.extend(quote! { .flavor(__private::Flavor::MultiThread) });
            }
            None => {}
        }
        if let Some((threads, _)) = &self.worker_threads {
            let threads = Literal::usize_suffixed(*threads);
            options.extend(quote! { .worker_threads(#threads) });
        }
        let env = self.env.unwrap_or(true);
        quote! {
            #start
            let #settings = __private::configure(#settings #options, #env);
        }
    }
}

/// The `settings = path` value: a path (`my_settings`, `crate::config::settings`), with hints
/// for a string, a call or anything else.
fn parse_settings_path(value: &Expr) -> syn::Result<syn::ExprPath> {
    let example = "`settings = my_settings`, where `fn my_settings() -> cluster::Settings`";
    let msg = match value {
        Expr::Group(group) => return parse_settings_path(&group.expr),
        Expr::Path(path) if path.attrs.is_empty() => return Ok(path.clone()),
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(string),
            ..
        }) => match string.parse::<Path>() {
            Ok(path) => {
                let path = path.to_token_stream().to_string().replace(' ', "");
                format!(
                    "`settings` takes a path, not a string: `settings = {path}` (without the \
                     quotes)"
                )
            }
            Err(_) => format!("`settings` must be the path of a function: {example}"),
        },
        Expr::Call(call) if call.args.is_empty() && matches!(*call.func, Expr::Path(_)) => {
            let path = call.func.to_token_stream().to_string().replace(' ', "");
            format!(
                "`settings` takes the function, not a call to it: `settings = {path}` (the macro \
                 calls it)"
            )
        }
        _ => format!("`settings` must be the path of a function: {example}"),
    };
    Err(syn::Error::new_spanned(value, msg))
}

/// The name of an argument, if it is one `#[cluster::main]` knows.
fn key_of(path: &Path) -> syn::Result<String> {
    let key = path.get_ident().map(ToString::to_string);
    match key {
        Some(key) if KEYS.contains(&key.as_str()) => Ok(key),
        _ => {
            let name = path.to_token_stream().to_string().replace(' ', "");
            let msg = format!("unknown argument `{name}`; expected one of {}", list_keys());
            Err(syn::Error::new_spanned(path, msg))
        }
    }
}

/// The error for an argument without a value: `#[cluster::main(workers)]`.
fn bare_path_error(path: &Path) -> syn::Error {
    let name = path
        .get_ident()
        .map(ToString::to_string)
        .unwrap_or_default();
    let msg = match name.as_str() {
        "workers" => "`workers` requires a value: `workers = 4`".to_owned(),
        "worker_threads" => "`worker_threads` requires a value: `worker_threads = 4`".to_owned(),
        "flavor" => "`flavor` requires a value: `flavor = \"multi_thread\"`".to_owned(),
        "settings" => "`settings` requires a value: `settings = my_settings`, where \
                       `fn my_settings() -> cluster::Settings`"
            .to_owned(),
        "env" => "`env` requires a value: `env = false` leaves out the `CLUSTER_*` environment \
                  overrides (`env = true` is the default)"
            .to_owned(),
        "crate" => "`crate` requires a value: `crate = \"cluster\"`".to_owned(),
        "multi_thread" | "current_thread" => {
            format!("set the runtime flavor with `#[cluster::main(flavor = \"{name}\")]`")
        }
        _ => {
            return key_of(path)
                .err()
                .unwrap_or_else(|| syn::Error::new_spanned(path, "expected a value"));
        }
    };
    syn::Error::new_spanned(path, msg)
}

/// `` `workers`, `flavor`, `worker_threads`, `settings`, `env`, `crate` ``.
fn list_keys() -> String {
    KEYS.iter()
        .map(|key| format!("`{key}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The literal of `key = <literal>`, looking through the invisible groups of `macro_rules!`.
fn literal(value: &Expr) -> Option<&Lit> {
    match value {
        Expr::Lit(lit) => Some(&lit.lit),
        Expr::Group(group) => literal(&group.expr),
        _ => None,
    }
}

fn parse_int(arg: &MetaNameValue, example: &str) -> syn::Result<usize> {
    let key = arg.path.to_token_stream();
    match literal(&arg.value) {
        Some(Lit::Int(int)) => int.base10_parse::<usize>().map_err(|error| {
            syn::Error::new_spanned(
                int,
                format!("`{key}` must be a positive integer that fits a `usize`: {error}"),
            )
        }),
        _ => Err(syn::Error::new_spanned(
            &arg.value,
            format!("`{key}` must be an integer literal: `{example}`"),
        )),
    }
}

fn parse_str(arg: &MetaNameValue, example: &str) -> syn::Result<syn::LitStr> {
    match literal(&arg.value) {
        Some(Lit::Str(value)) => Ok(value.clone()),
        _ => {
            let key = arg.path.to_token_stream();
            Err(syn::Error::new_spanned(
                &arg.value,
                format!("`{key}` must be a string literal: `{example}`"),
            ))
        }
    }
}

/// What `main` looks like, which decides what it expands to.
enum Form {
    /// `async fn main(role: cluster::Role)`: `run`.
    Role(PatType),
    /// `async fn main()`: `run_workers`.
    Workers,
    /// A signature that is neither (already reported): the body is still type-checked, in a
    /// closure taking the typed parameters, but nothing runs it.
    Invalid(Vec<PatType>),
}

/// Checks the signature and tells the form of the function.
fn check_signature(input: &MainFn, errors: &mut Errors) -> Form {
    let sig = &input.sig;
    if sig.asyncness.is_none() {
        let error = match input.expanded_by_tokio() {
            // The `let` that starts the body `tokio::main` wrote has the span of its attribute.
            Some((attr, span)) => {
                let msg = format!(
                    "`{attr}` above `#[cluster::main]` already turned this function into a Tokio \
                     runtime: `#[cluster::main]` builds the runtimes itself; remove `{attr}`"
                );
                syn::Error::new(span, msg)
            }
            None => syn::Error::new_spanned(
                sig.fn_token,
                "the `async` keyword is missing from the function declaration",
            ),
        };
        errors.push(error);
    }
    if !sig.generics.params.is_empty() {
        let msg = "a `#[cluster::main]` function cannot have generic parameters";
        errors.push(syn::Error::new_spanned(&sig.generics, msg));
    } else if let Some(where_clause) = &sig.generics.where_clause {
        let msg = "a `#[cluster::main]` function cannot have a `where` clause";
        errors.push(syn::Error::new_spanned(where_clause, msg));
    }

    let mut valid = true;
    let mut params = Vec::new();
    for arg in &sig.inputs {
        match arg {
            FnArg::Typed(param) => params.push(param.clone()),
            FnArg::Receiver(receiver) => {
                valid = false;
                let msg = "a `#[cluster::main]` function cannot take `self`";
                errors.push(syn::Error::new_spanned(receiver, msg));
            }
        }
    }
    if let Some(variadic) = &sig.variadic {
        valid = false;
        errors.push(syn::Error::new_spanned(
            variadic,
            "a `#[cluster::main]` function cannot be variadic",
        ));
    }
    if sig.inputs.len() > 1 {
        valid = false;
        let extra: TokenStream = sig
            .inputs
            .iter()
            .skip(1)
            .map(ToTokens::to_token_stream)
            .collect();
        let msg = "too many parameters: a `#[cluster::main]` function takes either no parameter (the macro \
                   forks the workers) or a single `cluster::Role`";
        errors.push(syn::Error::new_spanned(extra, msg));
    }
    match (valid, params.len()) {
        (true, 0) => Form::Workers,
        (true, 1) => Form::Role(params.remove(0)),
        _ => Form::Invalid(params),
    }
}

/// Expands the function: the same function, not `async` and without parameters, whose body
/// computes the `Settings` and runs the original body through `cluster::__private::run` or
/// `run_workers`.
fn expand(mut input: MainFn, config: &Config, form: Form) -> TokenStream {
    input.sig.asyncness = None;
    input.sig.inputs = Punctuated::new();
    input.sig.variadic = None;
    // Already reported: rustc would report generics on `main` again.
    input.sig.generics = syn::Generics::default();

    // If the body's type does not match the return type, rustc points at the returned
    // expression, which is generated: give it the span of the body's last statement, first token
    // to last, as `tokio::main` does. (On stable, a span cannot be joined: it is rebuilt from the
    // first and last tokens.)
    let (last_start, last_end) = span_range(input.stmts.last().cloned().unwrap_or_default());

    let krate = match &config.crate_path {
        Some(path) => path.to_token_stream(),
        None => quote! { ::cluster },
    };
    // The generated locals are invisible to the user's tokens (the body, the `settings` path).
    let settings = Ident::new("settings", Span::mixed_site());
    let settings_stmts = config.settings(&settings, &form);

    let output_type = match &input.sig.output {
        ReturnType::Default => quote! { () },
        ReturnType::Type(_, ty) => ty.to_token_stream(),
    };
    // Makes the body's type the declared return type before anything else looks at it, so that
    // `?` and `.into()` infer it and mismatches are reported in the body. Not for `!` or
    // `impl Trait`, which an `Output` cannot name.
    let check = match &input.sig.output {
        ReturnType::Type(_, ty)
            if matches!(**ty, syn::Type::Never(_)) || contains_impl_trait(ty) =>
        {
            quote! {}
        }
        _ => quote! {
            if false {
                let _: &dyn ::core::future::Future<Output = #output_type> = &body;
            }
        },
    };
    let block = input.body();
    // A parameter that is not a `Role` is reported at the parameter: the closure and its use get
    // its span.
    let (param_start, param_end) = match &form {
        Form::Role(param) => span_range(param.to_token_stream()),
        Form::Workers | Form::Invalid(_) => (Span::call_site(), Span::call_site()),
    };
    let (open, close) = (
        quote_spanned!(param_start=> |),
        quote_spanned!(param_end=> |),
    );
    let params = match &form {
        Form::Role(param) => quote! { #param },
        Form::Workers => quote! {},
        Form::Invalid(params) => quote! { #(#params),* },
    };
    let mut closure_body = Group::new(
        Delimiter::Brace,
        quote! {
            let body = async move #block;
            #check
            body
        },
    );
    closure_body.set_span(param_end);
    let body_ident = Ident::new("body", Span::mixed_site());
    let body = quote! {
        let #body_ident = #open #params #close #closure_body;
    };

    let (callee, args) = match form {
        Form::Role(param) => {
            let (ty_start, ty_end) = span_range(param.ty.to_token_stream());
            let identity = quote_spanned!(ty_start=> ::core::convert::identity);
            let body_ident = Ident::new("body", Span::mixed_site().located_at(ty_end));
            let body = quote_spanned!(ty_end=> (#body_ident));
            (
                quote_spanned! {last_start=> __private::run },
                quote! { #settings, #identity #body },
            )
        }
        Form::Workers => (
            quote_spanned! {last_start=> __private::run_workers },
            quote! { #settings, #body_ident },
        ),
        // Already reported: the body is type-checked, but nothing runs it.
        Form::Invalid(_) => {
            let last_block = quote! {
                let _ = #body_ident;
                ::core::panic!("`#[cluster::main]` failed to expand")
            };
            return input.into_tokens(body, last_block);
        }
    };
    // An error `main` returns is printed as a person reads it (`Display`, one line), not as
    // std's `Error: {:?}`: `MainReturn` picks that for a `Result` whose error is `Display` and
    // passes anything else through. Not for `()`, `!` or `impl Trait`, which have no such error.
    // The call spans the last statement, as the expression returned: it starts with a token of
    // the first token's span and ends with one of the last's.
    let call = quote! { #callee(#args) };
    let (report, call) = match &input.sig.output {
        ReturnType::Type(_, ty)
            if !matches!(**ty, syn::Type::Never(_)) && !contains_impl_trait(ty) =>
        {
            let mut wrapped = Group::new(
                Delimiter::Parenthesis,
                quote_spanned! {last_end=> &mut __private::MainReturn::new(#call) },
            );
            wrapped.set_span(last_start);
            let report = quote_spanned! {last_end=>
                // What `MainReturn` needs; one of the two is the one used.
                #[allow(unused_imports)]
                use __private::{PassOutput as _, ReportError as _};
            };
            (report, quote_spanned! {last_end=> #wrapped.finish_main() })
        }
        _ => (TokenStream::new(), call),
    };
    // The explicit `return` is intentional: see tokio-rs/tokio#4636.
    let last_block = quote_spanned! {last_end=>
        #[allow(clippy::needless_return, clippy::diverging_sub_expression, unused_qualifications)]
        {
            use #krate::__private;
            #report
            #settings_stmts
            return #call;
        }
    };

    input.into_tokens(body, last_block)
}

/// The spans of the first and last tokens, to rebuild the span of them all (on stable, spans
/// cannot be joined); the call site if there are none.
fn span_range(tokens: TokenStream) -> (Span, Span) {
    let mut tokens = tokens.into_iter();
    let start = tokens
        .next()
        .map_or_else(Span::call_site, |token| token.span());
    let end = tokens.last().map_or(start, |token| token.span());
    (start, end)
}

/// Whether a return type mentions `impl Trait`, which `Future<Output = ...>` cannot name.
fn contains_impl_trait(ty: &syn::Type) -> bool {
    use syn::{GenericArgument, PathArguments, Type};
    match ty {
        Type::ImplTrait(_) => true,
        Type::Array(t) => contains_impl_trait(&t.elem),
        Type::Ptr(t) => contains_impl_trait(&t.elem),
        Type::Reference(t) => contains_impl_trait(&t.elem),
        Type::Slice(t) => contains_impl_trait(&t.elem),
        Type::Tuple(t) => t.elems.iter().any(contains_impl_trait),
        Type::Paren(t) => contains_impl_trait(&t.elem),
        Type::Group(t) => contains_impl_trait(&t.elem),
        Type::Path(t) => t
            .path
            .segments
            .iter()
            .any(|segment| match &segment.arguments {
                PathArguments::AngleBracketed(args) => args.args.iter().any(|arg| match arg {
                    GenericArgument::Type(t) => contains_impl_trait(t),
                    GenericArgument::AssocType(t) => contains_impl_trait(&t.ty),
                    _ => false,
                }),
                PathArguments::Parenthesized(args) => {
                    args.inputs.iter().any(|arg| contains_impl_trait(&arg.ty))
                        || matches!(&args.output, ReturnType::Type(_, t) if contains_impl_trait(t))
                }
                PathArguments::None => false,
            }),
        _ => false,
    }
}

/// The errors found so far, combined into one.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn check(&mut self, result: syn::Result<()>) {
        if let Err(error) = result {
            self.push(error);
        }
    }
}

/// The runtime attributes `#[cluster::main]` cannot share a function with, by the last two
/// segments of their path (a bare `#[main]` or `#[test]` could be anything).
const RUNTIME_ATTRIBUTES: [[&str; 2]; 8] = [
    ["tokio", "main"],
    ["tokio", "test"],
    ["actix_web", "main"],
    ["actix_rt", "main"],
    ["async_std", "main"],
    ["smol_potat", "main"],
    ["compio", "main"],
    ["monoio", "main"],
];

/// The last two segments of an attribute's path, if it has two or more (`tokio::main` for
/// `#[::tokio::main(flavor = "multi_thread")]`).
fn last_two_segments(attr: &Attribute) -> Option<[String; 2]> {
    let segments = &attr.path().segments;
    let mut last = segments
        .iter()
        .rev()
        .map(|segment| segment.ident.to_string());
    match (last.next(), last.next()) {
        (Some(name), Some(krate)) => Some([krate, name]),
        _ => None,
    }
}

/// The error for an attribute below `#[cluster::main]` that must not be there, if it is one.
fn stacked_attribute_error(attr: &Attribute) -> Option<syn::Error> {
    let [krate, name] = last_two_segments(attr)?;
    let msg = if [krate.as_str(), name.as_str()] == ["cluster", "main"] {
        "`#[cluster::main]` is applied more than once to this function: remove one".to_owned()
    } else if RUNTIME_ATTRIBUTES.contains(&[krate.as_str(), name.as_str()]) {
        let hint = if krate == "tokio" && name == "main" {
            " (for a multi-thread runtime in each worker: \
             `#[cluster::main(flavor = \"multi_thread\")]`)"
        } else {
            ""
        };
        format!(
            "`#[{krate}::{name}]` cannot be combined with `#[cluster::main]`: `#[cluster::main]` \
             builds the Tokio runtime of the primary and of every worker itself; remove \
             `#[{krate}::{name}]`{hint}"
        )
    } else {
        return None;
    };
    Some(syn::Error::new_spanned(attr, msg))
}

/// Whether a body contains the path `runtime::Builder` (as in `tokio::runtime::Builder`) or the
/// message `"Failed building the Runtime"`, looking into every group.
fn builds_tokio_runtime(tokens: TokenStream) -> bool {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    tokens.iter().enumerate().any(|(i, token)| match token {
        TokenTree::Group(group) => builds_tokio_runtime(group.stream()),
        TokenTree::Literal(literal) => literal.to_string() == "\"Failed building the Runtime\"",
        TokenTree::Ident(ident) if ident == "runtime" => matches!(
            &tokens[i + 1..],
            [TokenTree::Punct(colon1), TokenTree::Punct(colon2), TokenTree::Ident(builder), ..]
                if colon1.as_char() == ':' && colon2.as_char() == ':' && builder == "Builder"
        ),
        _ => false,
    })
}

/// Whether a statement starts with `let body = async`, as the bodies `tokio::main` writes do.
fn is_let_body_async(stmt: &TokenStream) -> bool {
    let start: Vec<String> = stmt
        .clone()
        .into_iter()
        .take(4)
        .map(|token| token.to_string())
        .collect();
    start == ["let", "body", "=", "async"]
}

fn token_stream_with_error(mut tokens: TokenStream, error: syn::Error) -> TokenStream {
    tokens.extend(error.into_compile_error());
    tokens
}

/// `#[cluster::main]`.
pub(crate) fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    // If anything fails, still expand to an item as close as possible to the expected one, so
    // that IDEs keep working; only the `compile_error!`s are added.
    let input: MainFn = match syn::parse2(item.clone()) {
        Ok(input) => input,
        Err(error) => return token_stream_with_error(item, error),
    };
    let mut errors = Errors::default();
    let config = match AttributeArgs::parse_terminated.parse2(args) {
        Ok(args) => Config::parse(args, &mut errors),
        Err(error) => {
            errors.push(error);
            Config::default()
        }
    };
    let mut input = input;
    input.take_runtime_attributes(&mut errors);
    let form = check_signature(&input, &mut errors);
    config.validate(&form, &mut errors);
    let expanded = expand(input, &config, form);
    match errors.0 {
        None => expanded,
        Some(error) => token_stream_with_error(expanded, error),
    }
}

/// A function item whose body is kept as tokens: only split into statements at top-level `;`,
/// to find the last one. Not parsing the body is faster and lets a body that does not parse
/// reach rustc, which reports it better.
struct MainFn {
    outer_attrs: Vec<Attribute>,
    vis: Visibility,
    sig: Signature,
    brace_token: syn::token::Brace,
    inner_attrs: Vec<Attribute>,
    /// The statements, each with its `;` if it has one.
    stmts: Vec<TokenStream>,
}

impl MainFn {
    /// Removes the runtime attributes stacked below `#[cluster::main]` (`#[tokio::main]`, a
    /// second `#[cluster::main]`), each reported: left in place, they would expand on the
    /// generated non-`async` `main` and report that instead.
    fn take_runtime_attributes(&mut self, errors: &mut Errors) {
        self.outer_attrs
            .retain(|attr| match stacked_attribute_error(attr) {
                Some(error) => {
                    errors.push(error);
                    false
                }
                None => true,
            });
    }

    /// If `#[tokio::main]` (or `#[tokio::test]`) above `#[cluster::main]` expanded first, the
    /// attribute and where it is: the function is no longer `async`, its body starts with
    /// `let body = async { .. };`, whose tokens have the span of the attribute, and builds a Tokio
    /// runtime.
    fn expanded_by_tokio(&self) -> Option<(&'static str, Span)> {
        let first = self.stmts.first()?;
        if self.sig.asyncness.is_some()
            || !is_let_body_async(first)
            || !self.stmts.iter().cloned().any(builds_tokio_runtime)
        {
            return None;
        }
        let (span, _) = span_range(first.clone());
        // `#[tokio::test]` adds `#[::core::prelude::v1::test]`.
        let test = self.outer_attrs.iter().any(|attr| {
            last_two_segments(attr).is_some_and(|[v1, test]| v1 == "v1" && test == "test")
        });
        let attr = if test {
            "#[tokio::test]"
        } else {
            "#[tokio::main]"
        };
        Some((attr, span))
    }

    /// The original body, braces included.
    fn body(&self) -> TokenStream {
        let mut tokens = TokenStream::new();
        self.brace_token.surround(&mut tokens, |tokens| {
            tokens.extend(self.stmts.iter().cloned())
        });
        tokens
    }

    /// `attrs vis sig { body last_block }`.
    fn into_tokens(self, body: TokenStream, last_block: TokenStream) -> TokenStream {
        let mut tokens = TokenStream::new();
        for attr in self.outer_attrs {
            attr.to_tokens(&mut tokens);
        }
        // Inner attributes cannot stay in the body, which becomes an `async` block: lift them
        // onto the function, as `syn` does.
        for mut attr in self.inner_attrs {
            attr.style = syn::AttrStyle::Outer;
            attr.to_tokens(&mut tokens);
        }
        self.vis.to_tokens(&mut tokens);
        self.sig.to_tokens(&mut tokens);
        self.brace_token.surround(&mut tokens, |tokens| {
            tokens.extend(body);
            tokens.extend(last_block);
        });
        tokens
    }
}

impl Parse for MainFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let outer_attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        let sig: Signature = input.parse()?;

        let content;
        let brace_token = syn::braced!(content in input);
        let inner_attrs = Attribute::parse_inner(&content)?;

        let mut stmts = Vec::new();
        let mut stmt = TokenStream::new();
        while !content.is_empty() {
            if let Some(semi) = content.parse::<Option<Token![;]>>()? {
                semi.to_tokens(&mut stmt);
                stmts.push(std::mem::take(&mut stmt));
                continue;
            }
            stmt.extend([content.parse::<TokenTree>()?]);
        }
        if !stmt.is_empty() {
            stmts.push(stmt);
        }

        Ok(Self {
            outer_attrs,
            vis,
            sig,
            brace_token,
            inner_attrs,
            stmts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expansion of `#[cluster::main(args)] item`, as a string of tokens.
    fn expand(args: &str, item: &str) -> String {
        main(args.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    /// The `compile_error!` messages of an expansion.
    fn errors(args: &str, item: &str) -> Vec<String> {
        let expanded: TokenStream = main(args.parse().unwrap(), item.parse().unwrap());
        let mut messages = Vec::new();
        let tokens: Vec<TokenTree> = expanded.into_iter().collect();
        for window in tokens.windows(3) {
            if let [
                TokenTree::Ident(name),
                TokenTree::Punct(bang),
                TokenTree::Group(group),
            ] = window
                && name == "compile_error"
                && bang.as_char() == '!'
            {
                let literal: syn::LitStr = syn::parse2(group.stream()).unwrap();
                messages.push(literal.value());
            }
        }
        messages
    }

    /// The statements of the generated block that computes the settings and runs `main`.
    fn last_block(expanded: &str) -> &str {
        let start = expanded.find("use :: cluster :: __private ;").unwrap();
        &expanded[start..]
    }

    #[test]
    fn workers_form_defaults() {
        let expanded = expand("", "async fn main() {}");
        assert_eq!(
            last_block(&expanded),
            "use :: cluster :: __private ; \
             let settings = __private :: Settings :: new () ; \
             let settings = __private :: configure (settings , true) ; \
             return __private :: run_workers (settings , body) ; } }"
        );
    }

    #[test]
    fn workers_form_with_everything() {
        let expanded = expand(
            "settings = crate::config::settings, workers = 2, flavor = \"multi_thread\", \
             worker_threads = 3, env = false",
            "async fn main() -> std::io::Result<()> { Ok(()) }",
        );
        assert_eq!(
            last_block(&expanded),
            "use :: cluster :: __private ; \
             # [allow (unused_imports)] use __private :: { PassOutput as _ , ReportError as _ } ; \
             let settings : __private :: Settings = (crate :: config :: settings) () ; \
             let settings = __private :: configure (settings . workers (2usize) \
             . flavor (__private :: Flavor :: MultiThread) . worker_threads (3usize) , false) ; \
             return (& mut __private :: MainReturn :: new (__private :: run_workers (settings , body))) \
             . finish_main () ; } }"
        );
    }

    #[test]
    fn role_form() {
        let expanded = expand(
            "settings = my_settings, flavor = \"current_thread\", crate = \"my::cluster\"",
            "async fn main(role: cluster::Role) { drop(role) }",
        );
        assert!(expanded.starts_with("fn main () { let body = | role : cluster :: Role | {"));
        assert!(expanded.contains(
            "use my :: cluster :: __private ; \
             let settings : __private :: Settings = (my_settings) () ; \
             let settings = __private :: configure (settings \
             . flavor (__private :: Flavor :: CurrentThread) , true) ; \
             return __private :: run (settings , :: core :: convert :: identity (body)) ; } }"
        ));
        assert!(errors("", "async fn main(role: cluster::Role) {}").is_empty());
    }

    #[test]
    fn settings_must_be_a_path() {
        assert_eq!(
            errors("settings = \"config::settings\"", "async fn main() {}"),
            [
                "`settings` takes a path, not a string: `settings = config::settings` (without \
                 the quotes)"
            ]
        );
        assert_eq!(
            errors("settings = settings()", "async fn main() {}"),
            [
                "`settings` takes the function, not a call to it: `settings = settings` (the \
                 macro calls it)"
            ]
        );
        let closure = errors(
            "settings = || cluster::Settings::new()",
            "async fn main() {}",
        );
        assert_eq!(closure.len(), 1);
        assert!(closure[0].starts_with("`settings` must be the path of a function"));
        assert!(errors("settings = <T as Config>::settings", "async fn main() {}").is_empty());
    }

    #[test]
    fn env_must_be_a_bool() {
        assert!(errors("env = false", "async fn main() {}").is_empty());
        assert!(errors("env = true", "async fn main() {}").is_empty());
        for value in ["\"false\"", "0", "no", "!true"] {
            let errors = errors(&format!("env = {value}"), "async fn main() {}");
            assert_eq!(errors.len(), 1, "{value}");
            assert!(
                errors[0].starts_with("`env` must be `true` or `false`"),
                "{value}"
            );
        }
        assert_eq!(
            errors("env = false, env = true", "async fn main() {}"),
            ["`env` is set more than once"]
        );
    }

    #[test]
    fn keys() {
        assert_eq!(
            errors("threads = 4", "async fn main() {}"),
            [
                "unknown argument `threads`; expected one of `workers`, `flavor`, \
                 `worker_threads`, `settings`, `env`, `crate`"
            ]
        );
        assert_eq!(
            errors("settings", "async fn main() {}"),
            [
                "`settings` requires a value: `settings = my_settings`, where `fn my_settings() \
                 -> cluster::Settings`"
            ]
        );
    }

    #[test]
    fn worker_threads_and_settings() {
        // The `settings` function may set the multi-thread flavor: not for the macro to check.
        assert!(errors("settings = s, worker_threads = 2", "async fn main() {}").is_empty());
        let errors = errors(
            "settings = s, flavor = \"current_thread\", worker_threads = 2",
            "async fn main() {}",
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("`worker_threads` requires the `multi_thread`"));
    }

    #[test]
    fn runtime_attribute_below() {
        for attr in [
            "tokio::main",
            "::tokio::main",
            "tokio::main(flavor = \"multi_thread\")",
            "tokio::test",
            "actix_web::main",
            "actix_rt::main",
            "async_std::main",
            "smol_potat::main",
            "compio::main",
            "monoio::main",
        ] {
            let item = format!("#[allow(unused)] #[{attr}] async fn main() {{}}");
            let errors = errors("", &item);
            assert_eq!(errors.len(), 1, "{attr}");
            assert!(
                errors[0].contains("cannot be combined with `#[cluster::main]`"),
                "{attr}: {errors:?}"
            );
            // Removed from the expansion, other attributes kept.
            let expanded = expand("", &item);
            let removed = format!("# [{}]", attr.parse::<TokenStream>().unwrap());
            assert!(!expanded.contains(&removed), "{attr}: {expanded}");
            assert!(
                expanded.starts_with("# [allow (unused)] fn main ()"),
                "{attr}"
            );
        }
        assert_eq!(
            errors("", "#[tokio::main] async fn main() {}"),
            [
                "`#[tokio::main]` cannot be combined with `#[cluster::main]`: `#[cluster::main]` \
                 builds the Tokio runtime of the primary and of every worker itself; remove \
                 `#[tokio::main]` (for a multi-thread runtime in each worker: \
                 `#[cluster::main(flavor = \"multi_thread\")]`)"
            ]
        );
        assert_eq!(
            errors("", "#[cluster::main(workers = 2)] async fn main() {}"),
            ["`#[cluster::main]` is applied more than once to this function: remove one"]
        );
        // A bare `main` or `test` could be anything.
        assert!(errors("", "#[main] #[test] #[other::main] async fn main() {}").is_empty());
    }

    /// What `#[tokio::main]` (tokio-macros 2.7) makes of `async fn main() -> io::Result<()>`.
    const TOKIO_MAIN_OUTPUT: &str = r#"
        fn main() -> std::io::Result<()> {
            let body = async { Ok(()) };
            let body = {
                if false {
                    let _: &dyn ::core::future::Future<Output = std::io::Result<()>> = &body;
                }
                body
            };
            #[allow(clippy::expect_used, clippy::diverging_sub_expression, clippy::needless_return)]
            {
                use tokio::runtime::Builder;
                return Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("Failed building the Runtime")
                    .block_on(body);
            }
        }
    "#;

    #[test]
    fn runtime_attribute_above() {
        let expected = "`#[tokio::main]` above `#[cluster::main]` already turned this function \
                        into a Tokio runtime: `#[cluster::main]` builds the runtimes itself; \
                        remove `#[tokio::main]`";
        assert_eq!(errors("", TOKIO_MAIN_OUTPUT), [expected]);
        // Either clue is enough.
        let without_message = TOKIO_MAIN_OUTPUT.replace("Failed building the Runtime", "x");
        assert_eq!(errors("", &without_message), [expected]);
        let without_builder = TOKIO_MAIN_OUTPUT.replace("runtime::Builder", "Builder");
        assert_eq!(errors("", &without_builder), [expected]);
        // `#[tokio::test]` says so.
        let test = format!("#[::core::prelude::v1::test] {TOKIO_MAIN_OUTPUT}");
        assert!(errors("", &test)[0].starts_with("`#[tokio::test]` above"));
        // A runtime built by hand in a non-`async` function is just a missing `async`.
        let by_hand = "fn main() { \
                       tokio::runtime::Builder::new_current_thread().build().unwrap() \
                       .block_on(async {}) }";
        assert_eq!(
            errors("", by_hand),
            ["the `async` keyword is missing from the function declaration"]
        );
    }

    #[test]
    fn flavor_hints() {
        assert_eq!(Flavor::parse("multi_thread"), Ok(Flavor::MultiThread));
        assert_eq!(Flavor::parse("current_thread"), Ok(Flavor::CurrentThread));
        assert!(
            Flavor::parse("multi-thread")
                .unwrap_err()
                .ends_with("`multi_thread`?")
        );
    }
}
