//! What the record writers keep of each object between saves, in the objects' order: a save walks
//! the state and its last entries side by side, with no hashing and no key copied for an object it
//! already had (an edit of one object of 10,000 used to rehash and re-key all of them).

use std::collections::BTreeMap;

/// Remakes `last` (entries in key order) for `map`: each key of `map`, in order, with what `entry`
/// makes of its value and of the entry `last` held for that key, if any. Keys of `last` not in
/// `map` are dropped.
pub(crate) fn remake<K: Ord + Clone, V, T>(
    last: &mut Vec<(K, T)>,
    map: &BTreeMap<K, V>,
    mut entry: impl FnMut(&K, &V, Option<T>) -> T,
) {
    let mut old = std::mem::take(last).into_iter().peekable();
    let mut next = Vec::with_capacity(map.len());
    for (key, value) in map {
        while old.next_if(|(k, _)| k < key).is_some() {}
        let (key, kept) = match old.next_if(|(k, _)| k == key) {
            Some((k, t)) => (k, Some(t)),
            None => (key.clone(), None),
        };
        let made = entry(&key, value, kept);
        next.push((key, made));
    }
    *last = next;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_the_map_keeping_what_they_had() {
        let mut last = vec![(1, "one".to_owned()), (3, "three".to_owned()), (5, "five".to_owned())];
        let map = BTreeMap::from([(0, 'a'), (3, 'b'), (4, 'c'), (5, 'd')]);
        remake(&mut last, &map, |_, v, kept| kept.unwrap_or_else(|| v.to_string()));
        let expected = [(0, "a"), (3, "three"), (4, "c"), (5, "five")].map(|(k, v)| (k, v.to_owned()));
        assert_eq!(last, expected);
        remake(&mut last, &BTreeMap::<i32, char>::new(), |_, v, _| v.to_string());
        assert!(last.is_empty());
    }
}
