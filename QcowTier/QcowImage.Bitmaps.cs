namespace QcowTier;

public sealed partial class QcowImage
{
    /// <summary>
    /// The persistent dirty bitmaps (qemu-img info's "bitmaps"). On a writable open the enabled ones
    /// track every write, zeroing, discard and snapshot apply, and are stored back at a clean close.
    /// </summary>
    /// <returns>One entry per bitmap, in directory order.</returns>
    public IReadOnlyList<QcowBitmapInfo> GetBitmaps()
        => _core.ReadBitmaps().Select(b => new QcowBitmapInfo(b.Entry.Name, b.Entry.Granularity, b.Entry.Auto, b.Entry.InUse, !b.Consistent)).ToList();

    /// <summary>The ranges a bitmap marks dirty, in guest bytes (whole granules, clipped to the disk's end).</summary>
    /// <param name="name">The bitmap's name.</param>
    /// <returns>Sorted, non-adjacent ranges.</returns>
    /// <exception cref="QcowFormatException">The bitmap is inconsistent (IN_USE when the image was opened).</exception>
    public IReadOnlyList<(long Offset, long Length)> GetBitmapDirtyRanges(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _core.BitmapDirtyRanges(name);
    }

    /// <summary>Adds a clean persistent bitmap (qemu-img bitmap --add); needs a version 3 image.</summary>
    /// <param name="name">A name no other bitmap has (at most 1023 bytes of UTF-8).</param>
    /// <param name="granularity">Bytes per bit: a power of two from 512 to 2 GiB.</param>
    /// <param name="enabled">Whether it records writes from now on (the AUTO flag).</param>
    public void AddBitmap(string name, long granularity = 65536, bool enabled = true) => _core.AddBitmap(name, granularity, enabled);

    /// <summary>Removes a bitmap and frees its clusters (qemu-img bitmap --remove).</summary>
    /// <param name="name">The bitmap's name.</param>
    public void RemoveBitmap(string name) => _core.RemoveBitmap(name);

    /// <summary>Marks every bit of a bitmap clean (qemu-img bitmap --clear); an inconsistent bitmap becomes usable again.</summary>
    /// <param name="name">The bitmap's name.</param>
    public void ClearBitmap(string name) => _core.ClearBitmap(name);

    /// <summary>Marks dirty in one bitmap every range another bitmap of this image marks (qemu-img bitmap --merge).</summary>
    /// <param name="target">The bitmap that gains the dirty ranges.</param>
    /// <param name="source">The bitmap whose dirty ranges are added; unchanged.</param>
    public void MergeBitmap(string target, string source) => _core.MergeBitmap(target, source);

    /// <summary>
    /// Marks ranges dirty in a bitmap, e.g. those another image's bitmap marks
    /// (<see cref="GetBitmapDirtyRanges"/>; qemu-img bitmap --merge SOURCE -b FILE). Ranges past this
    /// disk's end are ignored; granules partly covered become dirty.
    /// </summary>
    /// <param name="name">The bitmap that gains the dirty ranges.</param>
    /// <param name="ranges">Guest byte ranges.</param>
    public void MarkBitmapDirty(string name, IReadOnlyList<(long Offset, long Length)> ranges)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(ranges);
        _core.MarkBitmapDirty(name, ranges);
    }

    /// <summary>Sets or clears a bitmap's AUTO flag (qemu-img bitmap --enable / --disable).</summary>
    /// <param name="name">The bitmap's name.</param>
    /// <param name="enabled">Whether it records writes.</param>
    public void SetBitmapEnabled(string name, bool enabled) => _core.SetBitmapEnabled(name, enabled);
}

/// <summary>One persistent dirty bitmap.</summary>
public sealed class QcowBitmapInfo
{
    internal QcowBitmapInfo(string name, long granularity, bool enabled, bool inUse, bool inconsistent)
    {
        Name = name;
        Granularity = granularity;
        Enabled = enabled;
        InUse = inUse;
        Inconsistent = inconsistent;
    }

    /// <summary>The bitmap's name.</summary>
    public string Name { get; }

    /// <summary>Bytes of disk one bit stands for.</summary>
    public long Granularity { get; }

    /// <summary>The AUTO flag: the bitmap records every write (qemu-img bitmap --enable / --disable).</summary>
    public bool Enabled { get; }

    /// <summary>The IN_USE flag as it is on disk now (set by a writer that tracks the bitmap while it runs).</summary>
    public bool InUse { get; }

    /// <summary>The bitmap was IN_USE when the image was opened: a writer did not store it (a crash); its bits cannot be trusted.</summary>
    public bool Inconsistent { get; }
}
