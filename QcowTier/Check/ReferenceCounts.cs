namespace QcowTier.Check;

/// <summary>
/// The reference count of every host cluster as the metadata actually uses it (QEMU's in-memory
/// refcount table). Sized from the real file length; it can only grow by the single partial
/// cluster QEMU tolerates past the end of the file, or when a repair extends the file.
/// </summary>
internal sealed class ReferenceCounts
{
    /// <summary>2^28 clusters (1 GiB of counters; 16 TiB of file with 64 KiB clusters): beyond that we refuse to check.</summary>
    public const long MaxClusters = 1L << 28;

    private readonly int _clusterBits;
    private readonly long _clusterSize;
    private readonly uint _max;
    private readonly ulong _refcountMax;
    private readonly Action<string> _corruption;
    private readonly Action<string> _note;
    private readonly string? _fileName;
    private readonly string _endOf;
    private uint[] _counts;

    /// <param name="clusters">Clusters of the counted file.</param>
    /// <param name="clusterBits">log2 of the cluster size.</param>
    /// <param name="refcountMax">The image's largest refcount.</param>
    /// <param name="fileLength">Length of the counted file.</param>
    /// <param name="corruption">Reports a corruption.</param>
    /// <param name="note">Reports a line that is not one.</param>
    /// <param name="fileName">The counted file's name, for errors.</param>
    /// <param name="endOf">What the counted file is called in messages ("the file" as in QEMU, or the tier data file).</param>
    public ReferenceCounts(long clusters, int clusterBits, ulong refcountMax, long fileLength, Action<string> corruption, Action<string> note, string? fileName, string endOf = "the file")
    {
        _fileName = fileName;
        _endOf = endOf;
        EnsureLimit(clusters);
        _clusterBits = clusterBits;
        _clusterSize = 1L << clusterBits;
        _refcountMax = refcountMax;
        // The image's refcount width bounds what a count may reach, as in QEMU; 32 bits is our own
        // ceiling, far above anything an image whose metadata fits in the file can reference.
        _max = (uint)Math.Min(refcountMax, uint.MaxValue);
        _corruption = corruption;
        _note = note;
        FileLength = fileLength;
        _counts = new uint[clusters + 1];
        Length = clusters;
    }

    /// <summary>Clusters covered (QEMU's nb_clusters).</summary>
    public long Length { get; private set; }

    /// <summary>The file length QEMU compares every reference against.</summary>
    public long FileLength { get; set; }

    public ulong RefcountMax => _refcountMax;

    public uint this[long cluster] => cluster < Length ? _counts[cluster] : 0;

    /// <summary>Counts one reference to every cluster touched by [offset, offset + size) (qcow2_inc_refcounts_imrt).</summary>
    public void Add(long offset, long size)
    {
        if (size <= 0)
        {
            return;
        }
        // The last cluster may be only partly present in the file; anything further out is a corruption.
        if (offset < 0 || offset > long.MaxValue - size || offset + size - FileLength >= _clusterSize)
        {
            _corruption($"ERROR: counting reference for region exceeding the end of {_endOf} by one cluster or more: offset 0x{offset:x} size 0x{size:x}");
            return;
        }
        var first = offset >> _clusterBits;
        var last = (offset + size - 1) >> _clusterBits;
        for (var k = first; k <= last; k++)
        {
            if (k >= Length)
            {
                Resize(k + 1);
            }
            var c = _counts[k];
            if (c >= _max)
            {
                _corruption($"ERROR: overflow cluster offset=0x{k << _clusterBits:x}");
                _note("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
                continue;
            }
            _counts[k] = c + 1;
        }
    }

    /// <summary>Marks a cluster the repair itself allocated: its count is exactly one.</summary>
    public void SetAllocated(long cluster)
    {
        if (cluster >= Length)
        {
            Resize(cluster + 1);
        }
        _counts[cluster] = 1;
    }

    public void Resize(long clusters)
    {
        EnsureLimit(clusters);
        if (clusters > _counts.Length)
        {
            var cap = Math.Min(MaxClusters, Math.Max(clusters, Math.Min(_counts.Length * 2L, _counts.Length + (1L << 20))));
            Array.Resize(ref _counts, (int)cap);
        }
        if (clusters > Length)
        {
            Length = clusters;
        }
    }

    /// <summary>Whether any cluster of [first, first + count) is referenced.</summary>
    public bool AnyInRange(long first, long count)
    {
        var end = Math.Min(Length, first + count);
        return first < end && _counts.AsSpan((int)first, (int)(end - first)).ContainsAnyExcept(0u);
    }

    private void EnsureLimit(long clusters)
    {
        if (clusters > MaxClusters)
        {
            throw new QcowException($"{_fileName ?? "image"}: the file spans {clusters} clusters; checking more than {MaxClusters} is refused");
        }
    }
}
