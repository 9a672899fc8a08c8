//! Parsing of `#[event(...)]` and the checks on `#[serde(...)]` that keep the serde
//! representation compatible with how `DomainEvent` stores an event's data.

use syn::{Attribute, LitInt, LitStr, Meta, Token, punctuated::Punctuated};

/// Longest event type name, in UTF-8 bytes (the event model's `EVENT_TYPE_BYTES_MAX`).
const EVENT_TYPE_BYTES_MAX: usize = 255;

/// What the `#[event(...)]` attributes of one item say.
#[derive(Default)]
pub(crate) struct EventAttr {
    /// `name = "..."`: the event type name, with the literal for error spans.
    pub(crate) name: Option<LitStr>,
    /// `version = N`: the schema version (at least 1).
    pub(crate) version: Option<u32>,
}

impl std::fmt::Debug for EventAttr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventAttr")
            .field("name", &self.name.as_ref().map(LitStr::value))
            .field("version", &self.version)
            .finish()
    }
}

/// Reads every `#[event(...)]` among `attrs`. Each key may appear once in total.
pub(crate) fn parse_event_attrs(attrs: &[Attribute]) -> syn::Result<EventAttr> {
    let mut parsed = EventAttr::default();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                if parsed.name.is_some() {
                    return Err(meta.error("duplicate `name` in #[event(...)]"));
                }
                let name: LitStr = meta.value()?.parse()?;
                if let Err(problem) = check_event_type_name(&name.value()) {
                    return Err(syn::Error::new(name.span(), problem));
                }
                parsed.name = Some(name);
                Ok(())
            } else if meta.path.is_ident("version") {
                if parsed.version.is_some() {
                    return Err(meta.error("duplicate `version` in #[event(...)]"));
                }
                let version: LitInt = meta.value()?.parse()?;
                let value: u32 = version.base10_parse()?;
                if value == 0 {
                    return Err(syn::Error::new(
                        version.span(),
                        "schema versions start at 1; `version = 0` is not allowed",
                    ));
                }
                parsed.version = Some(value);
                Ok(())
            } else {
                Err(meta.error(
                    "unknown key in #[event(...)]; expected `name = \"...\"` or `version = N`",
                ))
            }
        })?;
    }
    Ok(parsed)
}

/// Fails when any `#[event(...)]` is present (for places where it means nothing).
pub(crate) fn refuse_event_attrs(attrs: &[Attribute], reason: &str) -> syn::Result<()> {
    match attrs.iter().find(|attr| attr.path().is_ident("event")) {
        Some(attr) => Err(syn::Error::new_spanned(attr, reason)),
        None => Ok(()),
    }
}

/// The rules of the event model for event type names: 1..=255 bytes, no control characters.
pub(crate) fn check_event_type_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the event type name must not be empty".to_owned());
    }
    if name.len() > EVENT_TYPE_BYTES_MAX {
        return Err(format!(
            "the event type name is {} bytes long; the limit is {EVENT_TYPE_BYTES_MAX}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the event type name must not contain control characters".to_owned());
    }
    Ok(())
}

/// The items of every `#[serde(...)]` among `attrs`. Attributes that do not parse as a list of
/// meta items are skipped: serde reports those itself.
fn serde_items(attrs: &[Attribute]) -> Vec<Meta> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("serde"))
        .filter_map(|attr| {
            attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
                .ok()
        })
        .flatten()
        .collect()
}

/// Refuses container-level serde attributes that change how an enum's variants are tagged.
pub(crate) fn refuse_enum_container_serde_attrs(attrs: &[Attribute]) -> syn::Result<()> {
    for item in serde_items(attrs) {
        let path = item.path();
        let message = if path.is_ident("tag") || path.is_ident("content") {
            "#[serde(tag = ...)] / #[serde(content = ...)] is not supported on a DomainEvent enum: \
             an event is stored as its variant's data alone, with the event type naming the \
             variant, which needs serde's default externally tagged representation"
        } else if path.is_ident("untagged") {
            "#[serde(untagged)] is not supported on a DomainEvent enum: an event is stored as its \
             variant's data alone, with the event type naming the variant, which needs serde's \
             default externally tagged representation"
        } else if path.is_ident("rename_all") {
            "#[serde(rename_all = ...)] is not supported on a DomainEvent enum: it renames the \
             variants that stored events are decoded by; the event type name is set with \
             #[event(name = \"...\")] on the variant instead (#[serde(rename_all_fields = ...)] \
             is fine for field names)"
        } else {
            continue;
        };
        return Err(syn::Error::new_spanned(item, message));
    }
    Ok(())
}

/// Refuses variant-level serde attributes that rename, hide or untag a variant.
pub(crate) fn refuse_variant_serde_attrs(attrs: &[Attribute]) -> syn::Result<()> {
    for item in serde_items(attrs) {
        let path = item.path();
        let message = if path.is_ident("rename") || path.is_ident("alias") {
            "#[serde(rename = ...)] / #[serde(alias = ...)] is not supported on a DomainEvent \
             variant: stored events are decoded by the variant's own name; the event type name \
             is set with #[event(name = \"...\")] instead"
        } else if path.is_ident("skip")
            || path.is_ident("skip_serializing")
            || path.is_ident("skip_deserializing")
            || path.is_ident("other")
            || path.is_ident("untagged")
        {
            "this #[serde(...)] variant attribute is not supported on a DomainEvent variant: \
             every variant is an event type and must serialize and deserialize under its own \
             name"
        } else {
            continue;
        };
        return Err(syn::Error::new_spanned(item, message));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::*;

    fn attrs(item: syn::ItemEnum) -> Vec<Attribute> {
        item.attrs
    }

    #[test]
    fn event_attrs_default_to_nothing() {
        let parsed = parse_event_attrs(&attrs(parse_quote! { enum E {} })).unwrap();
        assert!(parsed.name.is_none());
        assert!(parsed.version.is_none());
    }

    #[test]
    fn event_attrs_read_name_and_version_across_attributes() {
        let parsed = parse_event_attrs(&attrs(parse_quote! {
            #[doc = "ignored"]
            #[event(name = "OrderPlaced.v2")]
            #[event(version = 3)]
            enum E {}
        }))
        .unwrap();
        assert_eq!(parsed.name.unwrap().value(), "OrderPlaced.v2");
        assert_eq!(parsed.version, Some(3));
    }

    #[test]
    fn event_attrs_refuse_bad_input() {
        let cases: Vec<(syn::ItemEnum, &str)> = vec![
            (
                parse_quote! { #[event(name = "A", name = "B")] enum E {} },
                "duplicate `name`",
            ),
            (
                parse_quote! { #[event(version = 1)] #[event(version = 2)] enum E {} },
                "duplicate `version`",
            ),
            (
                parse_quote! { #[event(version = 0)] enum E {} },
                "start at 1",
            ),
            (parse_quote! { #[event(version = -1)] enum E {} }, ""),
            (
                parse_quote! { #[event(name = "")] enum E {} },
                "must not be empty",
            ),
            (
                parse_quote! { #[event(name = "a\nb")] enum E {} },
                "control characters",
            ),
            (
                parse_quote! { #[event(type = "A")] enum E {} },
                "unknown key",
            ),
            (parse_quote! { #[event] enum E {} }, ""),
        ];
        for (item, expected) in cases {
            let error = parse_event_attrs(&item.attrs).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn event_type_names_follow_the_event_model() {
        assert!(check_event_type_name("OrderPlaced").is_ok());
        assert!(check_event_type_name(&"x".repeat(255)).is_ok());
        let too_long = check_event_type_name(&"x".repeat(256)).unwrap_err();
        assert!(too_long.contains("256 bytes"), "{too_long}");
    }

    #[test]
    fn container_serde_attrs_that_change_tagging_are_refused() {
        let refused: Vec<syn::ItemEnum> = vec![
            parse_quote! { #[serde(tag = "type")] enum E {} },
            parse_quote! { #[serde(tag = "t", content = "c")] enum E {} },
            parse_quote! { #[serde(untagged)] enum E {} },
            parse_quote! { #[serde(deny_unknown_fields, rename_all = "snake_case")] enum E {} },
        ];
        for item in refused {
            let error = refuse_enum_container_serde_attrs(&item.attrs).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("not supported on a DomainEvent enum"),
                "{error}"
            );
        }
        let rename_all = refuse_enum_container_serde_attrs(&attrs(
            parse_quote! { #[serde(rename_all = "camelCase")] enum E {} },
        ))
        .unwrap_err();
        assert!(
            rename_all.to_string().contains("#[event(name"),
            "{rename_all}"
        );
    }

    #[test]
    fn harmless_container_serde_attrs_pass() {
        let item: syn::ItemEnum = parse_quote! {
            #[derive(Serialize)]
            #[serde(deny_unknown_fields, rename_all_fields = "camelCase", bound(serialize = "T: Serialize"))]
            #[serde(crate = "serde")]
            enum E {}
        };
        refuse_enum_container_serde_attrs(&item.attrs).unwrap();
    }

    #[test]
    fn variant_serde_attrs_that_rename_or_hide_are_refused() {
        let item: syn::ItemEnum = parse_quote! {
            enum E {
                #[serde(rename = "a")] A,
                #[serde(alias = "b")] B,
                #[serde(rename(serialize = "c"))] C,
                #[serde(skip)] D,
                #[serde(other)] F,
            }
        };
        for variant in &item.variants {
            let error = refuse_variant_serde_attrs(&variant.attrs).unwrap_err();
            assert!(error.to_string().contains("DomainEvent variant"), "{error}");
        }
        let renamed = refuse_variant_serde_attrs(&item.variants[0].attrs).unwrap_err();
        assert!(renamed.to_string().contains("#[event(name"), "{renamed}");
    }

    #[test]
    fn harmless_variant_serde_attrs_pass() {
        let item: syn::ItemEnum = parse_quote! {
            enum E {
                #[serde(rename_all = "camelCase")] A { total_cents: u64 },
                #[serde(bound(deserialize = "T: Default"))] B(T),
                #[serde] C,
            }
        };
        for variant in &item.variants {
            refuse_variant_serde_attrs(&variant.attrs).unwrap();
        }
    }

    #[test]
    fn refuse_event_attrs_points_at_the_attribute() {
        let item: syn::ItemEnum = parse_quote! { #[event(name = "X")] enum E {} };
        let error = refuse_event_attrs(&item.attrs, "not here").unwrap_err();
        assert_eq!(error.to_string(), "not here");
        refuse_event_attrs(&[], "not here").unwrap();
    }
}
