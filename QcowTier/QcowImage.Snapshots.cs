namespace QcowTier;

public sealed partial class QcowImage
{
    private static void OpenSnapshotView(Engine.QcowCore core, QcowOpenOptions options)
    {
        try
        {
            if (!options.ReadOnly)
            {
                throw new ArgumentException("a snapshot can only be opened read-only", nameof(options));
            }
            core.UseSnapshotView(options.Snapshot!);
        }
        catch
        {
            // The caller disposes the storage; the core must not keep a tier file open either.
            core.DisposeTierFileOnly();
            throw;
        }
    }

    /// <summary>The internal snapshots, in table order (qemu-img snapshot -l).</summary>
    /// <returns>One entry per snapshot.</returns>
    public IReadOnlyList<QcowSnapshotInfo> GetSnapshots()
        => _core.ReadSnapshots().Select(s => new QcowSnapshotInfo(s)).ToList();

    /// <summary>
    /// Takes an internal snapshot of the disk (qemu-img snapshot -c): it shares every cluster with the
    /// active disk, and later writes copy what they change. Not available on tiered images.
    /// </summary>
    /// <param name="name">The new snapshot's name; it must differ from every existing one.</param>
    /// <returns>The snapshot as written.</returns>
    public QcowSnapshotInfo CreateSnapshot(string name) => new(_core.CreateSnapshot(name));

    /// <summary>Reverts the disk to a snapshot (qemu-img snapshot -a), including its virtual size.</summary>
    /// <param name="nameOrId">The snapshot's id, or else its name.</param>
    public void ApplySnapshot(string nameOrId) => _core.ApplySnapshot(nameOrId);

    /// <summary>Deletes a snapshot (qemu-img snapshot -d), freeing what only it referenced.</summary>
    /// <param name="nameOrId">The snapshot's id, or else its name.</param>
    public void DeleteSnapshot(string nameOrId) => _core.DeleteSnapshot(nameOrId);
}
