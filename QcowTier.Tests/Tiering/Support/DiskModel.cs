namespace QcowTier.Tests.Tiering.Support;

/// <summary>
/// What the guest should read: a plain byte array updated with the semantics QEMU gives each
/// operation (write-zeroes zeroes the whole range; discard zeroes only the whole clusters of the
/// range, plus the partial cluster at the end of the disk when the range reaches it).
/// </summary>
internal sealed class DiskModel
{
    public DiskModel(long size, int clusterSize)
    {
        Data = new byte[size];
        ClusterSize = clusterSize;
    }

    public byte[] Data { get; private set; }

    public int ClusterSize { get; }

    public long Size => Data.LongLength;

    public void Write(long offset, ReadOnlySpan<byte> data) => data.CopyTo(Data.AsSpan(checked((int)offset)));

    public void Zero(long offset, long length) => Data.AsSpan(checked((int)offset), checked((int)length)).Clear();

    public void Discard(long offset, long length)
    {
        var start = (offset + ClusterSize - 1) / ClusterSize * ClusterSize;
        var end = offset + length == Size ? Size : (offset + length) / ClusterSize * ClusterSize;
        if (end > start)
        {
            Zero(start, end - start);
        }
    }

    public void Resize(long newSize)
    {
        var grown = new byte[newSize];
        Data.CopyTo(grown, 0);
        Data = grown;
    }

    public DiskModel Clone()
    {
        var m = new DiskModel(Size, ClusterSize);
        Data.CopyTo(m.Data, 0);
        return m;
    }

    /// <summary>Writes the model as a raw image, for qemu-img compare.</summary>
    public string SaveRaw(string path)
    {
        File.WriteAllBytes(path, Data);
        return path;
    }
}
