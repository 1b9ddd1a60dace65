using System.Text;

namespace QcowTier.Nbd;

/// <summary>One image offered by an <see cref="NbdServer"/> under a name.</summary>
/// <remarks>
/// The server never disposes the image: whoever opened it closes it after the server has stopped. The
/// server flushes it when it stops, and may record heat into it (see <see cref="HeatFile"/>).
/// </remarks>
public sealed class NbdExport
{
    /// <summary>Describes an export.</summary>
    /// <param name="name">The export name clients ask for; the empty string is the default export, as in qemu-nbd.</param>
    /// <param name="image">The open image to serve; it may be plain or tiered.</param>
    public NbdExport(string name, QcowImage image)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(image);
        if (name.Contains('\0', StringComparison.Ordinal) || Encoding.UTF8.GetByteCount(name) > Protocol.MaxStringLength)
        {
            throw new ArgumentException($"an NBD export name has no NUL and at most {Protocol.MaxStringLength} UTF-8 bytes", nameof(name));
        }
        Name = name;
        Image = image;
    }

    /// <summary>The name clients ask for.</summary>
    public string Name { get; }

    /// <summary>The image served.</summary>
    public QcowImage Image { get; }

    /// <summary>Refuses writes, trims and zeroing with EPERM (always so when the image was opened read-only).</summary>
    public bool ReadOnly { get; init; }

    /// <summary>A human-readable description sent to clients that ask (NBD_INFO_DESCRIPTION, nbdinfo).</summary>
    public string? Description { get; init; }

    /// <summary>
    /// A heat sidecar file: while the server runs, every read and write of this export is recorded into the
    /// heat map loaded from it (or a new one when it does not exist), saved periodically and at shutdown.
    /// </summary>
    public string? HeatFile { get; init; }

    internal bool IsReadOnly => ReadOnly || Image.IsReadOnly;
}
