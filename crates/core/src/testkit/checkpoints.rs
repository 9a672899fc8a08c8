//! The contract of a [`CheckpointStore`], as one function every implementation runs.

use crate::{CHECKPOINT_NAME_BYTES_MAX, CheckpointError, CheckpointStore, Position};

/// Checks `store` (which must hold no checkpoint whose name starts with `conformance-`):
/// absent names load as `None`; saves overwrite, forwards and backwards; names are
/// independent; listing is in name order and bounded; deletes forget (and deleting the
/// unknown is fine); a name of exactly
/// [`CHECKPOINT_NAME_BYTES_MAX`] bytes works; invalid names are refused without touching
/// anything saved.
pub async fn checkpoint_store_conformance(store: &dyn CheckpointStore) {
    let a = "conformance-a";
    let b = "conformance-b ünïcode/with spaces";
    assert_eq!(store.load_checkpoint(a).await.unwrap(), None);
    store.save_checkpoint(a, Position(7)).await.unwrap();
    assert_eq!(store.load_checkpoint(a).await.unwrap(), Some(Position(7)));
    assert_eq!(
        store.load_checkpoint(b).await.unwrap(),
        None,
        "names are independent"
    );
    store.save_checkpoint(a, Position(1_000)).await.unwrap();
    store.save_checkpoint(a, Position(3)).await.unwrap();
    assert_eq!(
        store.load_checkpoint(a).await.unwrap(),
        Some(Position(3)),
        "a save overwrites, also backwards (a rebuild)"
    );
    store.save_checkpoint(b, Position(0)).await.unwrap();
    store
        .save_checkpoint(b, Position(u64::MAX >> 1))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint(b).await.unwrap(),
        Some(Position(u64::MAX >> 1))
    );

    let longest = format!("conformance-{}", "x".repeat(CHECKPOINT_NAME_BYTES_MAX - 12));
    assert_eq!(longest.len(), CHECKPOINT_NAME_BYTES_MAX);
    store.save_checkpoint(&longest, Position(5)).await.unwrap();
    assert_eq!(
        store.load_checkpoint(&longest).await.unwrap(),
        Some(Position(5))
    );
    let ours = |listed: Vec<(String, Position)>| {
        listed
            .into_iter()
            .filter(|(name, _)| name.starts_with("conformance-"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ours(store.list_checkpoints(100_000).await.unwrap()),
        [
            (a.to_owned(), Position(3)),
            (b.to_owned(), Position(u64::MAX >> 1)),
            (longest.clone(), Position(5)),
        ],
        "listed in name order"
    );
    assert_eq!(
        store.list_checkpoints(1).await.unwrap().len(),
        1,
        "at most count_max"
    );
    let too_long = format!("{longest}x");
    for name in [
        "",
        "conformance-\0nul",
        "conformance-\nline",
        too_long.as_str(),
    ] {
        for result in [
            store.load_checkpoint(name).await.map(|_| ()),
            store.save_checkpoint(name, Position(9)).await,
            store.delete_checkpoint(name).await,
        ] {
            assert!(
                matches!(
                    result,
                    Err(CheckpointError::InvalidName { max, .. }) if max == CHECKPOINT_NAME_BYTES_MAX
                ),
                "{name:?}: {result:?}"
            );
        }
    }

    store.delete_checkpoint(a).await.unwrap();
    assert_eq!(store.load_checkpoint(a).await.unwrap(), None);
    store.delete_checkpoint(a).await.unwrap();
    store
        .delete_checkpoint("conformance-never-saved")
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint(b).await.unwrap(),
        Some(Position(u64::MAX >> 1)),
        "nothing else was touched"
    );
    store.delete_checkpoint(b).await.unwrap();
    store.delete_checkpoint(&longest).await.unwrap();
    assert!(
        ours(store.list_checkpoints(100_000).await.unwrap()).is_empty(),
        "deleted ones are not listed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryCheckpointStore;

    #[tokio::test]
    async fn the_in_memory_store_keeps_the_contract() {
        checkpoint_store_conformance(&InMemoryCheckpointStore::new()).await;
    }
}
