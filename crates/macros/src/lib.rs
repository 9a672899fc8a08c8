//! Derive macros for factline.
//!
//! [`DomainEvent`](macro@DomainEvent) implements `factline_domain::DomainEvent` for a serde type.
//! Use it through `factline-domain` (or the `factline` facade), which re-exports it.

mod attrs;

use std::collections::HashMap;

use proc_macro::TokenStream;
use proc_macro_crate::{FoundCrate, crate_name};
use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::{Data, DataEnum, DeriveInput, Fields, Ident, LitStr, ext::IdentExt, parse_macro_input};

use crate::attrs::{
    check_event_type_name, parse_event_attrs, refuse_enum_container_serde_attrs,
    refuse_event_attrs, refuse_variant_serde_attrs,
};

/// Derives `DomainEvent` for an enum (one event type per variant) or a struct (one event type).
///
/// The type must also derive serde's `Serialize` and `Deserialize`. An enum keeps serde's default
/// externally tagged representation: the event's data is what serde writes under the variant's
/// name, and the event type says which variant it is.
///
/// - The event type name defaults to the variant (or struct) name; the schema version to 1.
/// - `#[event(name = "...", version = N)]` on a variant (or the struct) overrides either.
/// - Refused, because they change how variants are named or tagged: `#[serde(tag, content,
///   untagged, rename_all)]` on the enum and `#[serde(rename, alias, skip, other, untagged)]` on a
///   variant. Field-level serde attributes are fine.
///
/// ```text
/// #[derive(Serialize, Deserialize, DomainEvent)]
/// enum OrderEvent {
///     OrderPlaced { total_cents: u64 },
///     #[event(version = 2)]
///     PaymentReceived { amount_cents: u64 },
///     #[event(name = "OrderDispatched")]
///     OrderShipped,
/// }
/// ```
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input, &domain_crate_path())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// The path of the domain crate as the deriving crate sees it.
fn domain_crate_path() -> TokenStream2 {
    let path_of = |name: &str, suffix: TokenStream2| -> Option<TokenStream2> {
        let ident = syn::parse_str::<Ident>(name).ok()?;
        Some(quote!(::#ident #suffix))
    };
    let found = match crate_name("factline-domain") {
        // The domain crate names itself `factline_domain` (`extern crate self as ...`), which
        // also works in its integration tests and doc tests.
        Ok(FoundCrate::Itself) => None,
        Ok(FoundCrate::Name(name)) => path_of(&name, quote!()),
        Err(_) => match crate_name("factline") {
            Ok(FoundCrate::Itself) => Some(quote!(crate::domain)),
            Ok(FoundCrate::Name(name)) => path_of(&name, quote!(::domain)),
            Err(_) => None,
        },
    };
    found.unwrap_or_else(|| quote!(::factline_domain))
}

/// One event type of the deriving item.
struct EventType {
    /// The stored event type name.
    name: LitStr,
    /// The schema version.
    version: u32,
}

impl EventType {
    fn from_attrs(attrs: &[syn::Attribute], ident: &Ident) -> syn::Result<Self> {
        let parsed = parse_event_attrs(attrs)?;
        let name = match parsed.name {
            Some(name) => name,
            None => {
                let default = ident.unraw().to_string();
                check_event_type_name(&default)
                    .map_err(|problem| syn::Error::new(ident.span(), problem))?;
                LitStr::new(&default, ident.span())
            }
        };
        Ok(Self {
            name,
            version: parsed.version.unwrap_or(1),
        })
    }
}

fn expand(input: &DeriveInput, domain: &TokenStream2) -> syn::Result<TokenStream2> {
    let body = match &input.data {
        Data::Enum(data) => expand_enum(input, data, domain)?,
        Data::Struct(_) => expand_struct(input, domain)?,
        Data::Union(_) => {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "DomainEvent can be derived for an enum (one event type per variant) or a struct, \
                 not a union",
            ));
        }
    };

    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let mut where_clause = where_clause.cloned();
    if !input.generics.params.is_empty() {
        where_clause
            .get_or_insert_with(|| syn::parse_quote!(where))
            .predicates
            .push(syn::parse_quote!(
                #ident #type_generics: #domain::__private::serde::Serialize
                    + #domain::__private::serde::de::DeserializeOwned
            ));
    }
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics #domain::DomainEvent for #ident #type_generics #where_clause {
            #body
        }
    })
}

fn expand_struct(input: &DeriveInput, domain: &TokenStream2) -> syn::Result<TokenStream2> {
    let event = EventType::from_attrs(&input.attrs, &input.ident)?;
    let EventType { name, version } = &event;
    Ok(quote! {
        fn event_type(&self) -> &'static str {
            #name
        }

        fn schema_version(&self) -> u32 {
            #version
        }

        fn event_types() -> &'static [&'static str] {
            &[#name]
        }

        fn encode(
            &self,
        ) -> ::core::result::Result<#domain::__private::serde_json::Value, #domain::EncodeError> {
            #domain::__private::encode_struct(self, #name)
        }

        fn decode(
            event_type: &str,
            schema_version: u32,
            data: #domain::__private::serde_json::Value,
        ) -> ::core::result::Result<Self, #domain::DecodeError> {
            if event_type != #name {
                return ::core::result::Result::Err(
                    #domain::__private::unknown_event_type(event_type),
                );
            }
            #domain::__private::decode_data(#name, schema_version, #version, data)
        }
    })
}

fn expand_enum(
    input: &DeriveInput,
    data: &DataEnum,
    domain: &TokenStream2,
) -> syn::Result<TokenStream2> {
    refuse_event_attrs(
        &input.attrs,
        "#[event(...)] goes on each variant of a DomainEvent enum (each variant is one event type), \
         not on the enum",
    )?;
    refuse_enum_container_serde_attrs(&input.attrs)?;
    if data.variants.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "a DomainEvent enum needs at least one variant (one per event type)",
        ));
    }

    let mut patterns = Vec::new();
    let mut names = Vec::new();
    let mut versions = Vec::new();
    let mut serde_keys = Vec::new();
    let mut first_use_of_name: HashMap<String, Ident> = HashMap::new();
    for variant in &data.variants {
        refuse_variant_serde_attrs(&variant.attrs)?;
        let event = EventType::from_attrs(&variant.attrs, &variant.ident)?;
        if let Some(first) = first_use_of_name.get(&event.name.value()) {
            return Err(syn::Error::new(
                event.name.span(),
                format!(
                    "event type name {:?} is already used by variant `{first}`; each variant needs \
                     its own name (set one with #[event(name = \"...\")])",
                    event.name.value()
                ),
            ));
        }
        first_use_of_name.insert(event.name.value(), variant.ident.clone());

        let variant_ident = &variant.ident;
        patterns.push(match &variant.fields {
            Fields::Named(_) => quote!(Self::#variant_ident { .. }),
            Fields::Unnamed(_) => quote!(Self::#variant_ident(..)),
            Fields::Unit => quote!(Self::#variant_ident),
        });
        serde_keys.push(LitStr::new(
            &variant_ident.unraw().to_string(),
            variant_ident.span(),
        ));
        names.push(event.name);
        versions.push(event.version);
    }

    Ok(quote! {
        fn event_type(&self) -> &'static str {
            match self {
                #(#patterns => #names,)*
            }
        }

        fn schema_version(&self) -> u32 {
            match self {
                #(#patterns => #versions,)*
            }
        }

        fn event_types() -> &'static [&'static str] {
            &[#(#names),*]
        }

        fn encode(
            &self,
        ) -> ::core::result::Result<#domain::__private::serde_json::Value, #domain::EncodeError> {
            let (event_type, serde_key) = match self {
                #(#patterns => (#names, #serde_keys),)*
            };
            #domain::__private::encode_variant(self, event_type, serde_key)
        }

        fn decode(
            event_type: &str,
            schema_version: u32,
            data: #domain::__private::serde_json::Value,
        ) -> ::core::result::Result<Self, #domain::DecodeError> {
            let (known_type, serde_key, supported_version) = match event_type {
                #(#names => (#names, #serde_keys, #versions),)*
                _ => {
                    return ::core::result::Result::Err(
                        #domain::__private::unknown_event_type(event_type),
                    );
                }
            };
            #domain::__private::decode_variant(
                known_type,
                serde_key,
                schema_version,
                supported_version,
                data,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::*;

    fn expand_to_string(input: DeriveInput) -> Result<String, String> {
        expand(&input, &quote!(::factline_domain))
            .map(|tokens| tokens.to_string())
            .map_err(|error| error.to_string())
    }

    #[test]
    fn enum_expansion_names_every_variant() {
        let expanded = expand_to_string(parse_quote! {
            enum OrderEvent {
                OrderPlaced { total_cents: u64 },
                #[event(name = "PaymentTaken", version = 2)]
                PaymentReceived(Payment),
                OrderShipped,
            }
        })
        .unwrap();
        assert!(expanded.contains("impl :: factline_domain :: DomainEvent for OrderEvent"));
        assert!(expanded.contains(r#"& ["OrderPlaced" , "PaymentTaken" , "OrderShipped"]"#));
        assert!(
            expanded.contains(
                r#"Self :: PaymentReceived (..) => ("PaymentTaken" , "PaymentReceived")"#
            )
        );
        assert!(expanded.contains("Self :: OrderShipped => 1u32"));
        assert!(expanded.contains("Self :: PaymentReceived (..) => 2u32"));
    }

    #[test]
    fn struct_expansion_uses_the_struct_name_or_the_override() {
        let plain = expand_to_string(parse_quote! { struct OrderPlaced { total: u64 } }).unwrap();
        assert!(plain.contains(r#"& ["OrderPlaced"]"#), "{plain}");
        let renamed = expand_to_string(parse_quote! {
            #[event(name = "order.placed", version = 4)]
            struct OrderPlaced(u64);
        })
        .unwrap();
        assert!(renamed.contains(r#"& ["order.placed"]"#), "{renamed}");
        assert!(renamed.contains("4u32"), "{renamed}");
    }

    #[test]
    fn generic_items_get_serde_bounds() {
        let expanded = expand_to_string(parse_quote! { enum Wrapped<T> { Happened(T) } }).unwrap();
        assert!(
            expanded.contains(
                "where Wrapped < T > : :: factline_domain :: __private :: serde :: Serialize"
            ),
            "{expanded}"
        );
    }

    #[test]
    fn raw_identifiers_lose_their_prefix() {
        let expanded = expand_to_string(parse_quote! { enum E { r#Type } }).unwrap();
        assert!(expanded.contains(r#"& ["Type"]"#), "{expanded}");
    }

    #[test]
    fn duplicate_event_type_names_are_refused() {
        let error = expand_to_string(parse_quote! {
            enum E {
                Placed,
                #[event(name = "Placed")]
                PlacedAgain,
            }
        })
        .unwrap_err();
        assert!(
            error.contains("already used by variant `Placed`"),
            "{error}"
        );
    }

    #[test]
    fn misplaced_or_unsupported_items_are_refused() {
        let cases: Vec<(DeriveInput, &str)> = vec![
            (parse_quote! { enum E {} }, "at least one variant"),
            (parse_quote! { union U { a: u32 } }, "not a union"),
            (
                parse_quote! { #[event(name = "X")] enum E { A } },
                "goes on each variant",
            ),
            (
                parse_quote! { #[serde(tag = "type")] enum E { A } },
                "externally tagged",
            ),
            (
                parse_quote! { enum E { #[serde(rename = "a")] A } },
                "#[event(name",
            ),
        ];
        for (input, expected) in cases {
            let error = expand_to_string(input).unwrap_err();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn struct_serde_attrs_are_left_to_serde() {
        // A struct is stored as a whole, so any representation round-trips.
        expand_to_string(parse_quote! {
            #[serde(tag = "kind", rename_all = "camelCase")]
            struct OrderPlaced { total_cents: u64 }
        })
        .unwrap();
    }
}
