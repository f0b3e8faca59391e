//! `#[cluster::main]`: argument parsing, signature checks and expansion.
//!
//! Modelled on `tokio-macros`' `entry.rs`: the body is not parsed (only split at top-level `;`
//! to find the span of its last statement), errors are `syn::Error`s combined into one, and on
//! error the function is still expanded as far as possible so that IDEs keep working.

use proc_macro2::{Delimiter, Group, Literal, Span, TokenStream, TokenTree};
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
const KEYS: [&str; 4] = ["workers", "flavor", "worker_threads", "crate"];

/// The flavor of the worker runtimes (the primary always runs on a current-thread runtime).
#[derive(Clone, Copy, PartialEq, Eq)]
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
        if let Some((threads, arg)) = &self.worker_threads
            && self.flavor != Some(Flavor::MultiThread)
        {
            let msg = format!(
                "`worker_threads` requires the `multi_thread` runtime flavor: use \
                 `#[cluster::main(flavor = \"multi_thread\", worker_threads = {threads})]`"
            );
            errors.push(syn::Error::new_spanned(arg, msg));
        }
    }

    /// `RuntimeOptions::new()` with the options set, for where `__private` is in scope.
    fn runtime_options(&self) -> TokenStream {
        let mut options = quote! { __private::RuntimeOptions::new() };
        match self.flavor {
            Some(Flavor::CurrentThread) => {
                options = quote! { #options.flavor(__private::Flavor::CurrentThread) };
            }
            Some(Flavor::MultiThread) => {
                options = quote! { #options.flavor(__private::Flavor::MultiThread) };
            }
            None => {}
        }
        if let Some((threads, _)) = &self.worker_threads {
            let threads = Literal::usize_suffixed(*threads);
            options = quote! { #options.worker_threads(#threads) };
        }
        options
    }
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

/// `` `workers`, `flavor`, `worker_threads`, `crate` ``.
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
fn check_signature(sig: &Signature, errors: &mut Errors) -> Form {
    if sig.asyncness.is_none() {
        let msg = "the `async` keyword is missing from the function declaration";
        errors.push(syn::Error::new_spanned(sig.fn_token, msg));
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
/// runs the original one through `cluster::__private::run` or `run_workers`.
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
    let options = config.runtime_options();

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
    let body = quote! {
        let body = #open #params #close #closure_body;
    };

    let (callee, args) = match form {
        Form::Role(param) => {
            let (ty_start, ty_end) = span_range(param.ty.to_token_stream());
            let identity = quote_spanned!(ty_start=> ::core::convert::identity);
            let body = quote_spanned!(ty_end=> (body));
            (
                quote_spanned! {last_start=> __private::run },
                quote! { #options, #identity #body },
            )
        }
        Form::Workers => {
            let workers = match &config.workers {
                Some((workers, _)) => {
                    let workers = Literal::usize_suffixed(*workers);
                    quote! { ::core::option::Option::Some(#workers) }
                }
                None => quote! { ::core::option::Option::None },
            };
            (
                quote_spanned! {last_start=> __private::run_workers },
                quote! { #options, #workers, body },
            )
        }
        // Already reported: the body is type-checked, but nothing runs it.
        Form::Invalid(_) => {
            let last_block = quote! {
                let _ = body;
                ::core::panic!("`#[cluster::main]` failed to expand")
            };
            return input.into_tokens(body, last_block);
        }
    };
    // The explicit `return` is intentional: see tokio-rs/tokio#4636. The call spans the last
    // statement: its callee has the span of the first token, its parentheses that of the last.
    let last_block = quote_spanned! {last_end=>
        #[allow(clippy::needless_return, clippy::diverging_sub_expression, unused_qualifications)]
        {
            use #krate::__private;
            return #callee(#args);
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
    let form = check_signature(&input.sig, &mut errors);
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
