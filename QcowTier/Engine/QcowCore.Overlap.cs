using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// QEMU's metadata overlap check (qcow2_pre_write_overlap_check, overlap-check=cached): before anything is
/// written to the primary file, the target range must not hold metadata other than the structure being
/// written. A damaged image whose tables point into each other is then marked corrupt and refused instead
/// of having its metadata overwritten. Every caller holds the metadata lock.
/// </summary>
internal sealed partial class QcowCore
{
    [Flags]
    private enum Meta
    {
        None = 0,
        Header = 1,
        ActiveL1 = 2,
        ActiveL2 = 4,
        RefcountTable = 8,
        RefcountBlock = 16,
        TierHints = 32,
        Snapshots = 64,        // the snapshot table and the snapshots' L1 tables
        BitmapDirectory = 128,
    }

    private HashSet<long>? _activeL2;   // host offsets of the L2 tables the L1 table points to
    private ulong[]? _activeL2Source;   // the L1 array _activeL2 was built from
    private bool _activeL2Dropped;      // an L1 entry moved off a table that the L1 on disk still points to

    private HashSet<long> ActiveL2Tables()
    {
        if (_activeL2 is null || !ReferenceEquals(_activeL2Source, _l1))
        {
            var set = new HashSet<long>();
            foreach (var e in _l1)
            {
                var off = (long)(e & ClusterLayout.L1OffsetMask);
                if (off != 0)
                {
                    set.Add(off);
                }
            }
            _activeL2 = set;
            _activeL2Source = _l1;
        }
        return _activeL2;
    }

    /// <summary>An L1 entry now points at a newly allocated L2 table.</summary>
    private void NoteNewL2(long offset)
    {
        if (_activeL2 is not null && ReferenceEquals(_activeL2Source, _l1))
        {
            _activeL2.Add(offset);
        }
    }

    /// <summary>An L1 entry stopped pointing at its old L2 table: rebuild the set when next needed.</summary>
    private void ForgetActiveL2() => _activeL2 = null;

    private static bool Overlaps(long offset, long length, long start, long bytes)
        => bytes > 0 && offset < start + bytes && start < offset + length;

    private Meta MetadataIn(long clusterOffset)
    {
        var m = Meta.None;
        if (clusterOffset == 0)
        {
            m |= Meta.Header;
        }
        if (Overlaps(clusterOffset, _clusterSize, Header.L1TableOffset, _l1.Length * 8L))
        {
            m |= Meta.ActiveL1;
        }
        if (Overlaps(clusterOffset, _clusterSize, _refcounts.TableOffset, (long)_refcounts.TableClusters << _clusterBits)
            || _hddRefcounts is not null && Overlaps(clusterOffset, _clusterSize, _hddRefcounts.TableOffset, (long)_hddRefcounts.TableClusters << _clusterBits))
        {
            m |= Meta.RefcountTable;
        }
        if (_refcounts.IsBlock(clusterOffset) || _hddRefcounts?.IsBlock(clusterOffset) == true)
        {
            m |= Meta.RefcountBlock;
        }
        if (ActiveL2Tables().Contains(clusterOffset))
        {
            m |= Meta.ActiveL2;
        }
        if (_tier is { HintsCount: > 0 } t
            && Overlaps(clusterOffset, _clusterSize, t.HintsOffset, (long)t.HintsCount * TierExtension.HintEntrySize))
        {
            m |= Meta.TierHints;
        }
        if (IsSnapshotMetadata(clusterOffset))
        {
            m |= Meta.Snapshots;
        }
        if (IsBitmapDirectory(clusterOffset))
        {
            m |= Meta.BitmapDirectory;
        }
        return m;
    }

    private static string Describe(Meta m) => m switch
    {
        _ when (m & Meta.Header) != 0 => "qcow2_header",
        _ when (m & Meta.ActiveL1) != 0 => "active L1 table",
        _ when (m & Meta.ActiveL2) != 0 => "active L2 table",
        _ when (m & Meta.RefcountTable) != 0 => "refcount table",
        _ when (m & Meta.RefcountBlock) != 0 => "refcount block",
        _ when (m & Meta.Snapshots) != 0 => "snapshot table or inactive L1 table",
        _ when (m & Meta.BitmapDirectory) != 0 => "bitmap directory",
        _ => "TIER hints table",
    };

    /// <summary>
    /// Refuses a write of <paramref name="length"/> bytes at <paramref name="offset"/> in the primary file
    /// that would land on metadata other than <paramref name="ignore"/>: marks the image corrupt and throws.
    /// </summary>
    private void CheckOverlap(long offset, long length, Meta ignore)
    {
        if (length <= 0)
        {
            return;
        }
        var first = offset >> _clusterBits;
        var last = (offset + length - 1) >> _clusterBits;
        for (var c = first; c <= last; c++)
        {
            var found = MetadataIn(c << _clusterBits) & ~ignore;
            if (found != Meta.None)
            {
                SignalCorruption(offset, "metadata overlap", $"Preventing invalid write on metadata (overlaps with {Describe(found)})");
            }
        }
    }

    /// <summary>Hooks a refcount manager whose tables live in the primary file up to the overlap check and the corrupt bit.</summary>
    private void GuardRefcounts(RefcountManager manager)
    {
        manager.BeforeMetadataWrite = (offset, length, isTable) => CheckOverlap(offset, length, isTable ? Meta.RefcountTable : Meta.RefcountBlock);
        manager.Corruption = SignalCorruption;
    }
}
